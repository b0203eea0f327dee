"""``distree bench``: time a bundle's segments here; against a baseline, exit 1 on a confirmed regression."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from distree.cli import NON_NEGATIVE, OUTPUT_FILE, POSITIVE
from distree.errors import DistreeError


@click.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path, file_okay=False))
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="An earlier `distree bench --out` of this bundle's model: compare, exit 1 on a regression.")
@click.option("--out", "out_path", type=OUTPUT_FILE, default=None,
              help="Write this measurement (JSON, atomically): the next run's --baseline.")
@click.option("--tolerance", type=POSITIVE, default=0.15, show_default=True,
              help="Relative slowdown of a segment's median that counts as a regression.")
@click.option("--min-delta-ms", type=NON_NEGATIVE, default=0.01, show_default=True,
              help="...and it must also be this much slower in absolute terms (tiny segments are noisy).")
@click.option("--repeats", type=int, default=50, show_default=True, help="Timed rounds (after the warm-up).")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed rounds first.")
@click.option("--threads", type=int, default=1, show_default=True, help="Threads per segment runtime.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurement (and comparison) as JSON.")
def bench_cmd(bundle: Path, baseline_path: Optional[Path], out_path: Optional[Path], tolerance: float,
              min_delta_ms: float, repeats: int, warmup: int, threads: int, as_json: bool) -> None:
    """Measure BUNDLE's per-segment latency on this machine (segments built for other machines are listed as
    not measurable). With --baseline: exit 1 when a segment or the end-to-end pass is slower beyond
    --tolerance on two measurements in a row; exit 2 for a baseline of another model or plan."""
    from rich.console import Console

    from distree.bench.compare import compare
    from distree.bench.measure import BenchResult, measure_bundle, remeasure
    from distree.bench.report import print_comparison, print_measurement

    if repeats < 3 or warmup < 0 or threads < 1:
        raise DistreeError("--repeats must be >= 3, --warmup >= 0 and --threads >= 1")
    baseline = BenchResult.load(baseline_path) if baseline_path else None   # a bad file fails before measuring
    now = measure_bundle(bundle, repeats=repeats, warmup=warmup, threads=threads)
    if out_path:
        now.save(out_path)
    comparison = None
    if baseline is not None:
        comparison = compare(now, baseline, tolerance, min_delta_ms,
                             lambda keys: remeasure(bundle, keys, repeats, warmup, threads))
    console = Console(stderr=as_json, width=max(Console().width, 140))
    if as_json:
        doc = {"measurement": now.to_dict(), "comparison": comparison.to_dict() if comparison else None}
        click.echo(json.dumps(doc, indent=2))
    else:
        print_measurement(now, console)
        if comparison:
            print_comparison(comparison, console)
    sys.stdout.flush()
    skipped = [s for s in now.segments if not s.measurable]
    if skipped:
        click.echo(f"warning: {len(skipped)} of {len(now.segments)} segment(s) NOT MEASURABLE HERE: "
                   + "; ".join(f"{s.file}: {s.reason}" for s in skipped), err=True)
    if comparison and comparison.regressions:
        click.echo("regression: " + "; ".join(
            f"{r.key} ({r.file or 'all measurable segments'}) {r.baseline_ms:.4f} ms -> {r.now_ms:.4f} ms, "
            f"re-measured {r.remeasured_ms:.4f} ms ({r.change:+.0%}, tolerance {tolerance:.0%})"
            for r in comparison.regressions), err=True)
        raise click.exceptions.Exit(1)
