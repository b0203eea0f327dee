"""``distree run``: execute a whole bundle in this process and report predictions, exits and timings."""

from __future__ import annotations

import json
from typing import Optional

import click


@click.command("run")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help=".npz with x (N,C,H,W float32) and optionally y (labels) for accuracy.")
@click.option("--limit", type=int, default=None, help="Only the first N samples.")
@click.option("--threads", type=int, default=1, show_default=True, help="Threads per segment runtime.")
@click.option("--deadline-ms", type=float, default=None, help="Answer early when the rest would miss this deadline.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the full report (JSON) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def run_cmd(bundle: str, input_path: str, limit: Optional[int], threads: int, deadline_ms: Optional[float],
            output: Optional[str], as_json: bool) -> None:
    """Run BUNDLE on the samples of --input, every stage in one process (batch 1, one request at a time)."""
    from distree.runtime.data import load_inputs
    from distree.runtime.executor import run_bundle
    from distree.serde import write_json_atomic

    report = run_bundle(bundle, load_inputs(input_path), threads=threads, limit=limit, deadline_ms=deadline_ms)
    if output:
        write_json_atomic(output, report.to_dict())
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    acc = f", accuracy {report.accuracy:.4f}" if report.accuracy is not None else ""
    click.echo(f"{report.samples} samples{acc}; end-to-end median {report.end_to_end['median_ms']:.3f} ms, "
               f"p90 {report.end_to_end['p90_ms']:.3f} ms (compute only, {report.threads} thread(s))")
    click.echo("exits: " + ", ".join(f"{k} {v:.1%}" for k, v in report.exit_rates.items()))
    for st in report.stages:
        click.echo(f"  stage {st.device}: reached by {st.reached}, median {st.median_ms:.3f} ms, p90 {st.p90_ms:.3f} ms")
    for seg in report.segments:
        click.echo(f"    {seg.file} [{seg.backend}]: {seg.count} runs, median {seg.median_ms:.3f} ms, "
                   f"p90 {seg.p90_ms:.3f} ms")
    if report.deadline_exits:
        click.echo(f"{report.deadline_exits} sample(s) answered early because of --deadline-ms")
    for note in report.substitutions:
        click.echo(f"note: {note}")
    if not output:
        click.echo("predictions and per-sample exits: add --json or -o report.json")
