"""Tables for a measurement and for its comparison with a baseline."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from distree.bench.compare import Comparison
from distree.bench.measure import BenchResult

STYLE = {"regressed": "bold red", "noise": "yellow", "faster": "green", "not measurable": "bold yellow",
         "gone": "yellow", "new": "cyan"}


def _ms(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_measurement(r: BenchResult, console: Console) -> None:
    console.print(f"[bold]distree bench[/bold] {r.bundle} (manifest {r.manifest_sha256[:12]}, model "
                  f"{r.model_sha256[:12]}) on {r.host}, {r.cpu_count} CPUs, {r.threads} thread(s); {r.repeats} "
                  f"rounds after {r.warmup} warm-up; load average {r.load_average[0]:.2f} -> "
                  f"{r.load_average_after[0]:.2f}; distree {r.distree_version}, TVM {r.tvm_version}, "
                  f"ONNX Runtime {r.ort_version}")
    table = Table(show_edge=False, pad_edge=False, title="per-segment latency on this machine")
    for col in ("segment", "file", "backend", "exit", "median ms", "p90 ms", "note"):
        table.add_column(col, justify="right" if col.endswith("ms") else "left", overflow="fold")
    for s in (*r.segments, r.end_to_end):
        if s.measurable:
            table.add_row(s.key, s.file or s.device, s.backend, s.exit or "", _ms(s.median_ms), _ms(s.p90_ms), "")
        else:
            table.add_row(s.key, s.file or s.device, s.backend, s.exit or "",
                          "[bold yellow]NOT MEASURABLE HERE[/bold yellow]", "-", s.reason)
    console.print(table)


def print_comparison(c: Comparison, console: Console) -> None:
    table = Table(show_edge=False, pad_edge=False,
                  title=f"against the baseline (medians; tolerance {c.tolerance:.0%} and {c.min_delta_ms:g} ms; "
                        "suspects re-measured once)")
    for col in ("segment", "baseline ms", "now ms", "re-measured ms", "change", "status"):
        table.add_column(col, justify="left" if col in ("segment", "status") else "right")
    for row in c.rows:
        style = STYLE.get(row.status, "")
        status = f"[{style}]{row.status}[/{style}]" if style else row.status
        change = "" if row.change is None else f"{row.change:+.1%}"
        table.add_row(row.key, _ms(row.baseline_ms), _ms(row.now_ms), _ms(row.remeasured_ms), change, status)
    console.print(table)
    for w in c.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
