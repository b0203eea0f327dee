"""Views of a simulation: two rich tables and a latency-versus-rate PNG."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distree.serde import write_bytes_atomic
from distree.sim.simulate import SimReport


def print_report(report: SimReport, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 160))
    console.print(f"[bold]distree simulate[/bold] {report.plan}: {report.mode}; devices {', '.join(report.devices)} "
                  f"(source {report.source}); {report.n_samples} samples replayed from {report.samples}; "
                  f"jitter {'on' if report.jitter else 'off'}, seed {report.seed}")
    table = Table(show_edge=False, pad_edge=False, title="configurations (alone in the system)")
    for col, justify in [("configuration", "left"), ("layout", "left"), ("cost model ms", "right"),
                         ("simulated ms", "right"), ("worst ms", "right"), ("capacity req/s", "right"),
                         ("bottleneck", "left"), ("accuracy", "right"), ("answered at", "left"), ("note", "left")]:
        table.add_column(col, justify=justify, overflow="fold")
    for c in report.configurations:
        exits = ", ".join(f"{k} {v:.1%}" for k, v in c.exit_rates.items())
        note = "; ".join(x for x in (c.note, f"violates {', '.join(c.violations)}" if c.violations else "") if x)
        table.add_row(c.name, c.description, f"{c.predicted_ms:.3f}", f"{c.alone_mean_ms:.3f}", f"{c.worst_ms:.3f}",
                      f"{c.saturation_rps:.1f}", c.bottleneck, f"{c.accuracy:.4f}", exits, note)
    console.print(table)
    load = Table(show_edge=False, pad_edge=False, title="under load (FIFO devices and links)")
    for col in ("configuration", "load", "offered/capacity", "mean ms", "p50 ms", "p90 ms", "p99 ms", "queued ms",
                "throughput req/s", "busiest device"):
        load.add_column(col, justify="left" if col in ("configuration", "busiest device") else "right")
    for c in report.configurations:
        for pt in c.points:
            dev = max(report.devices, key=lambda d: pt.utilisation.get(d, 0.0))
            rho = "" if pt.offered_load is None else f"{pt.offered_load:.2f}"
            load.add_row(c.name, pt.label, rho, f"{pt.mean_ms:.3f}", f"{pt.p50_ms:.3f}", f"{pt.p90_ms:.3f}",
                         f"{pt.p99_ms:.3f}", f"{pt.mean_wait_ms:.3f}", f"{pt.throughput_rps:.1f}",
                         f"{dev} {pt.utilisation.get(dev, 0.0):.0%}")
    console.print(load)
    for note in report.notes:
        console.print(f"note: {note}")


def plot_report(report: SimReport, path: str | Path) -> Path:
    """Mean (solid) and p99 (dashed) latency against the Poisson rate, one colour per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for c in report.configurations:
        pts = sorted((p for p in c.points if p.rate_rps is not None), key=lambda p: p.rate_rps)
        if not pts:
            continue
        line, = ax.plot([p.rate_rps for p in pts], [p.mean_ms for p in pts], "o-", label=c.name)
        ax.plot([p.rate_rps for p in pts], [p.p99_ms for p in pts], "--", color=line.get_color(), alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("arrival rate (req/s, Poisson)")
    ax.set_ylabel("latency (ms): mean solid, p99 dashed")
    ax.set_title(f"simulated latency vs load ({report.mode})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())
