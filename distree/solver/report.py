"""Human-readable views of a Plan and of an accuracy-drop sweep (table and PNG)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from distree.serde import write_bytes_atomic
from distree.solver.plan import WITHIN_GAP, Plan


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 140))
    table = Table(show_edge=False, pad_edge=False, title="distree plan")
    for col, justify in [("stage", "right"), ("device", "left"), ("blocks", "left"), ("reach", "right"),
                         ("exits (threshold, exit rate)", "left"), ("compute ms", "right"),
                         ("transfer-in ms", "right"), ("memory", "right")]:
        table.add_column(col, justify=justify, overflow="fold")
    for k, s in enumerate(plan.stages):
        exits = ", ".join(f"{e.name}@{e.after_block} (>= {e.threshold:.3f}, {e.exit_rate:.1%})" for e in s.exits)
        table.add_row(str(k), s.device, f"{s.first_block}..{s.last_block}", f"{s.reach_rate:.1%}", exits or "-",
                      f"{s.compute_ms:.3f}", f"{s.transfer_in_ms:.3f}", _mib(s.memory_bytes))
    console.print(table)
    b = plan.breakdown_ms
    console.print(
        f"expected latency {plan.expected_latency_ms:.3f} ms (compute {b.get('compute', 0):.3f}, heads "
        f"{b.get('heads', 0):.3f}, transfers {b.get('transfers', 0):.3f}, return {b.get('return', 0):.3f}); "
        f"worst case (no exit) {plan.worst_case_latency_ms:.3f} ms")
    ratio = plan.expected_latency_ms / plan.no_exit_latency_ms        # nan where no plan without exits fits
    console.print(f"best plan without exits {plan.no_exit_text()}" + ("" if ratio != ratio else f" -> ratio {ratio:.3f}")
                  + f"; answered by the final classifier: {plan.final_rate:.1%}")
    for line in (plan.hops_line(), plan.capacity_line()):
        if line:
            console.print(line)
    console.print(
        f"accuracy {plan.accuracy:.4f} (lower bound {plan.accuracy_lcb:.4f} at {plan.confidence:g}), full model "
        f"{plan.full_model_accuracy:.4f}, allowed drop {plan.accuracy_drop:g} "
        f"(>= {plan.required_correct}/{plan.n_samples} right)")
    proof = ("(proven)" if plan.status == "optimal" else
             f"- as asked by --gap: no plan is faster than {plan.bound_ms:.3f} ms (proven gap {plan.gap:.1%})"
             if plan.status == WITHIN_GAP else
             f"- NOT proven optimal: no plan is faster than {plan.bound_ms:.3f} ms (proven gap {plan.gap:.1%})")
    console.print(f"solver {plan.solver}: status {plan.status} {proof}; {plan.wall_s:.2f} s")
    stats = plan.model_stats
    milp = (f"; MILP {stats['variables']:.0f} variables, {stats['constraints']:.0f} rows, "
            f"{stats['sample_classes']:.0f} sample classes" if stats.get("variables") else "")
    seeded = start_note(plan)
    console.print(f"  ({plan.sol_status}{milp}{'; ' + seeded if seeded else ''})", style="dim")


def start_note(plan: Plan) -> str:
    """What the plan a solve started from (``--start``) cost in it; "" when it started from none."""
    stats = plan.model_stats
    if "start_feasible" not in stats:
        return ""
    if "start_ms" not in stats:
        return "started from a plan whose configuration fits no device here"
    return (f"started from a plan of {stats['start_ms']:.3f} ms here"
            + ("" if stats["start_feasible"] else " (infeasible here)"))


def sweep_rows(points) -> list[dict]:
    rows = []
    for pt in points:
        if pt.plan is None:
            rows.append({"accuracy_drop": pt.accuracy_drop, "feasible": False, "error": pt.error})
            continue
        p = pt.plan
        rows.append({"accuracy_drop": pt.accuracy_drop, "feasible": True,
                     "expected_latency_ms": p.expected_latency_ms, "worst_case_latency_ms": p.worst_case_latency_ms,
                     "no_exit_latency_ms": p.no_exit_latency_ms, "accuracy": p.accuracy,
                     "accuracy_lcb": p.accuracy_lcb, "exits": sum(len(s.exits) for s in p.stages),
                     "stages": len(p.stages), "status": p.status, "gap": p.gap, "wall_s": p.wall_s})
    return rows


def print_sweep(points, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 140))
    table = Table(show_edge=False, pad_edge=False, title="latency-accuracy frontier")
    for col in ("drop", "expected ms", "no-exit ms", "ratio", "accuracy", "LCB", "exits", "stages", "status",
                "proven gap", "wall s"):
        table.add_column(col, justify="right")
    errors = []
    for row in sweep_rows(points):
        if not row["feasible"]:
            table.add_row(f"{row['accuracy_drop']:g}", "infeasible", "", "", "", "", "", "", "see below", "", "")
            errors.append(f"drop {row['accuracy_drop']:g}: {row['error']}")
            continue
        table.add_row(f"{row['accuracy_drop']:g}", f"{row['expected_latency_ms']:.3f}",
                      f"{row['no_exit_latency_ms']:.3f}",
                      f"{row['expected_latency_ms'] / row['no_exit_latency_ms']:.3f}", f"{row['accuracy']:.4f}",
                      f"{row['accuracy_lcb']:.4f}", str(row["exits"]), str(row["stages"]), row["status"],
                      f"{row['gap']:.1%}", f"{row['wall_s']:.2f}")
    console.print(table)
    for error in errors:                 # whole: they end with the setting that would work
        console.print(error, soft_wrap=True)


def plot_sweep(points, path: str | Path) -> Path:
    """Expected latency against accuracy, one point per allowed drop, written atomically as PNG."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in sweep_rows(points) if r["feasible"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["accuracy"] for r in rows], [r["expected_latency_ms"] for r in rows], "o-", label="distree plan")
    for r in rows:
        ax.annotate(f"drop {r['accuracy_drop']:g}", (r["accuracy"], r["expected_latency_ms"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    if rows:
        ax.axhline(rows[0]["no_exit_latency_ms"], color="grey", ls="--", label="best plan without exits")
    ax.set_xlabel("accuracy on calibration data")
    ax.set_ylabel("expected latency (ms)")
    ax.set_title("latency-accuracy frontier")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())
