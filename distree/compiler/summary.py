"""The final summary of ``distree compile``: plan table, predictions, backends and bundle size per device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from distree.compiler.manifest import MANIFEST, THRESHOLDS, Manifest
from distree.exits.scores import never_threshold
from distree.sim.baselines import idle_device_lines
from distree.solver.plan import INTERRUPTED, WITHIN_GAP
from distree.solver.report import start_note


def device_sizes(bundle: Path, manifest: Manifest) -> dict[str, dict[str, int]]:
    """Bytes per device folder: everything stored, and what the device actually loads (shipped files)."""
    out: dict[str, dict[str, int]] = {}
    for stage in manifest.stages:
        entry = out.setdefault(stage.name, {"stored_bytes": 0, "shipped_bytes": 0})
        files = {f for s in stage.segments for f in (s.file, s.onnx_file, s.tvm_file) if f}
        entry["stored_bytes"] += sum((bundle / f).stat().st_size for f in files)
        entry["shipped_bytes"] += sum((bundle / s.file).stat().st_size for s in stage.segments)
    return out


def summary_dict(result) -> dict[str, Any]:
    m: Manifest = result.manifest
    plan = result.plan
    return {
        "bundle": str(result.bundle), "wall_s": result.wall_s, "stage_seconds": result.stage_seconds,
        "cached_stages": list(result.cached),
        "expected_latency_ms": plan.expected_latency_ms, "worst_case_latency_ms": plan.worst_case_latency_ms,
        "no_exit_latency_ms": plan.no_exit_latency_ms, "traffic": plan.traffic,
        "idle_hops_measured": plan.idle_hops_measured, "accuracy": plan.accuracy, "accuracy_lcb": plan.accuracy_lcb,
        "full_model_accuracy": plan.full_model_accuracy,
        "solver": {"engine": plan.solver, "status": plan.status, "gap": plan.gap, "bound_ms": plan.bound_ms,
                   "wall_s": plan.wall_s, "start_ms": plan.model_stats.get("start_ms")},
        "stages": [{"device": st.name, "blocks": [st.first_block, st.last_block],
                    "segments": [{"file": s.file, "backend": s.backend, "ratio": s.ratio, "exit": s.exit,
                                  "reason": s.backend_reason} for s in st.segments]} for st in m.stages],
        "sizes": device_sizes(result.bundle, m), "notes": list(m.notes),
        "unused_devices": list(result.idle_ms),
        "unused_device_ms": result.idle_ms,
        "costs": result.costs,
    }


def print_summary(result, console) -> None:
    from rich.table import Table

    m: Manifest = result.manifest
    plan = result.plan
    sizes = device_sizes(result.bundle, m)
    table = Table(title=f"plan ({plan.solver}, {plan.status})")
    for col in ("stage", "device", "blocks", "exits (threshold, rate)", "reach", "compute ms", "segments: backend "
                "(TVM/ORT)", "shipped / stored"):
        table.add_column(col)
    for i, (st, pst) in enumerate(zip(m.stages, plan.stages)):
        exits = ", ".join(f"{e.name} ({e.threshold:.3f}, {e.exit_rate:.0%})" for e in pst.exits) or "-"
        segs = ", ".join(f"{s.backend}" + (f" ({s.ratio:.1f}x)" if s.ratio is not None else "") for s in st.segments)
        size = sizes[st.name]
        table.add_row(str(i), st.name, f"{st.first_block}..{st.last_block}", exits, f"{pst.reach_rate:.0%}",
                      f"{pst.compute_ms:.3f}", segs,
                      f"{size['shipped_bytes'] / 1024:.0f} / {size['stored_bytes'] / 1024:.0f} KiB")
    console.print(table)
    console.print(f"predicted latency: expected {plan.expected_latency_ms:.3f} ms, worst case "
                  f"{plan.worst_case_latency_ms:.3f} ms (no exits: {plan.no_exit_text()})")
    console.print(f"predicted accuracy: {plan.accuracy:.4f} (lower bound {plan.accuracy_lcb:.4f}; full model "
                  f"{plan.full_model_accuracy:.4f}, allowed drop {plan.accuracy_drop})")
    hops = plan.hops_line()
    if hops:
        console.print(hops)
    capacity = plan.capacity_line()
    if capacity:
        console.print(f"predicted {capacity}; `distree simulate` shows latency under load")
    if plan.status == WITHIN_GAP:
        console.print(f"plan proven within --gap in {plan.wall_s:.0f} s: no plan is faster than "
                      f"{plan.bound_ms:.3f} ms (proven gap {plan.gap:.1%})")
    elif plan.status != "optimal":
        further = ("Ctrl-C ended the search" if plan.status == INTERRUPTED else
                   "a longer --time-limit searches further")
        console.print(f"[yellow]plan not proven optimal[/yellow] in {plan.wall_s:.0f} s: no plan is faster than "
                      f"{plan.bound_ms:.3f} ms (proven gap {plan.gap:.1%}); {further}")
    started = start_note(plan)
    if started:
        console.print(started)
    console.print("costs: " + "; ".join(f"{device} {how}" for device, how in result.costs.items()))
    for line in idle_device_lines(result.idle_ms, plan.expected_latency_ms, f"`distree simulate {result.bundle}`"):
        console.print(line, highlight=False)
    for note in m.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    cached = f" (cached: {', '.join(result.cached)})" if result.cached else ""
    console.print(f"bundle: {result.bundle} in {result.wall_s:.1f} s{cached}")


def print_retuned(result) -> None:
    """``distree retune``'s report: each exit's threshold and share before and after, on the new data."""

    plan, before, after = result.plan, result.before, result.after
    never = never_threshold(plan.score_kind)
    device_of = {c.name: (stage.device, c.after_block) for stage in plan.stages for c in stage.exits}

    def threshold(value: float) -> str:
        return "off" if value >= never else f"{value:.4f}"

    click.echo(f"on {result.samples} samples of --data: full model {result.full_model_accuracy:.4f}; a table must "
               f"answer {result.required_correct} right (accuracy drop {plan.accuracy_drop:g}"
               + (f" at confidence {result.confidence:g}" if result.confidence else "") + ")")
    rows = [("exit", "device", "after block", "threshold: current -> retuned", "leaves there")]
    for name, (device, block) in device_of.items():
        rows.append((name, device, str(block), f"{threshold(before.thresholds[name])} -> "
                     f"{threshold(after.thresholds[name])}",
                     f"{before.exit_rates[name]:.1%} -> {after.exit_rates[name]:.1%}"))
    rows.append(("final", "", "", "", f"{before.exit_rates['final']:.1%} -> {after.exit_rates['final']:.1%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    verdict = "meets the bound" if before.meets_bound else "MISSES the bound"
    click.echo(f"current table on --data: expected {before.expected_ms:.3f} ms, accuracy {before.accuracy:.4f}: "
               f"{verdict}")
    proof = ("proven optimal for this placement and these exits" if plan.status == "optimal" else
             f"{plan.status}, proven gap {plan.gap:.1%}: a longer --time-limit searches further")
    click.echo(f"retuned table: expected {after.expected_ms:.3f} ms, accuracy {after.accuracy:.4f} ({proof})")
    off = [name for name in device_of if after.thresholds[name] >= never]
    if off:
        click.echo(f"off: {', '.join(off)} (a threshold above any score: it answers no one, but its head is "
                   "compiled into its segment and still runs; `distree compile` again drops it)")
    held = result.held_out
    if held is not None:
        bound = held.full_model_accuracy - held.accuracy_drop
        click.echo(f"on {held.samples} samples of --test: full model {held.full_model_accuracy:.4f}, so the bound is "
                   f"{bound:.4f}; current table {held.current['accuracy']:.4f}, retuned {held.retuned['accuracy']:.4f}"
                   + ("" if held.retuned["accuracy"] >= bound - 1e-12 else
                      " (under the bound out of sample: more --data, or --confidence for a margin)"))
    for note in result.substitutions:
        click.echo(f"note: scored with {note}")
    click.echo(f"bundle: {result.bundle}; copy its {MANIFEST} and {THRESHOLDS} to every device and restart each "
               "`distree serve` (every device's folder is unchanged)")
