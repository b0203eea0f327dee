"""``distree run``: execute a whole bundle in this process and report predictions, exits and timings."""

from __future__ import annotations

import json
import sys
from typing import Optional

import click

from distree.cli import OUTPUT_FILE, OUTPUT_FILE_OR_STDOUT, POSITIVE


def tls_options(command):
    """--tls-cert/--tls-key/--tls-ca: mutual TLS (distree.runtime.tls), the same three flags on serve and infer."""
    for flag, what in reversed((("--tls-cert", "this party's certificate (PEM)"), ("--tls-key", "its private key (PEM)"),
                                ("--tls-ca", "the CA (PEM) that signed every device's and client's certificate"))):
        command = click.option(flag, type=click.Path(dir_okay=False), default=None,
                               help=f"Mutual TLS: {what}; give all three or none.")(command)
    return command


@click.command("run")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help=".npz with x (N,C,H,W float32) and optionally y (labels) for accuracy.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N samples.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="Threads per segment runtime.")
@click.option("--deadline-ms", type=POSITIVE, default=None,
              help="Answer early when the rest would miss this deadline.")
@click.option("-o", "--output", type=OUTPUT_FILE, help="Write the full report (JSON) here.")
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
    if report.predicted_here:
        click.echo(f"mean {report.end_to_end['mean_ms']:.3f} ms per sample; the plan predicted "
                   f"{report.predicted_ms:.3f} ms (from the profile's medians; this loop adds its own overhead)")
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


@click.command("serve")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--device", required=True, help="The device this server runs (a stage of the bundle, or its source).")
@click.option("--listen", required=True, help="HOST:PORT to serve on (port 0: any free port, printed on start).")
@click.option("--next", "next_address", default=None, help="HOST:PORT of the next stage's server.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="Threads per segment runtime.")
@click.option("--forward-timeout-s", type=POSITIVE, default=10.0, show_default=True,
              help="Longest wait for the next stage's answer.")
@tls_options
def serve_cmd(bundle: str, device: str, listen: str, next_address: Optional[str], threads: int,
              forward_timeout_s: float, tls_cert: Optional[str], tls_key: Optional[str],
              tls_ca: Optional[str]) -> None:
    """Serve DEVICE's stage of BUNDLE over gRPC until interrupted (Ctrl-C or SIGTERM)."""
    import signal

    from distree.runtime.server import serve_stage
    from distree.runtime.tls import load_tls

    server = serve_stage(bundle, device, listen, next_address, threads=threads,
                         forward_timeout_s=forward_timeout_s, tls=load_tls(tls_cert, tls_key, tls_ca))
    signal.signal(signal.SIGTERM, lambda *_: server.stop(1.0))
    for note in server.notes:
        click.echo(f"note: {note}")
    click.echo(f"serving {server.description} of bundle {server.bundle_id[:12]} on {server.address}"
               + (", mutual TLS" if server.tls else ", plain gRPC (no TLS: any host that reaches the port may ask)")
               + (f", next stage at {next_address}" if next_address else ""), nl=True)
    sys.stdout.flush()
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop(1.0)


@click.command("infer")
@click.argument("address")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help=".npz with x (N,C,H,W float32) and optionally y (labels) for accuracy.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N samples.")
@click.option("--deadline-ms", type=POSITIVE, default=None,
              help="Per-request deadline: stages answer from an exit when the rest would miss it.")
@click.option("--timeout-s", type=POSITIVE, default=10.0, show_default=True, help="Longest wait for one answer.")
@click.option("--rate", type=POSITIVE, default=None,
              help="Open loop: requests arrive at Poisson times at this many per second, answered or not "
                   "(as `distree simulate --rate`); latency counts from each arrival.")
@click.option("--clients", type=click.IntRange(1, 64), default=None,
              help="Closed loop: this many requesters, each sending as soon as its last answer is back "
                   "(as `distree simulate --clients`). Default: one at a time.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --rate arrivals.")
@click.option("--json", "json_path", type=OUTPUT_FILE, default=None,
              help="Write the full report (per-sample answers, exits, reasons, timings) here.")
@tls_options
def infer_cmd(address: str, input_path: str, limit: Optional[int], deadline_ms: Optional[float], timeout_s: float,
              rate: Optional[float], clients: Optional[int], seed: int, json_path: Optional[str],
              tls_cert: Optional[str], tls_key: Optional[str], tls_ca: Optional[str]) -> None:
    """Send every sample of --input to the pipeline served at ADDRESS (its source device): one at a time, or
    under a load (--rate, --clients) to set beside `distree simulate`'s."""
    from distree.errors import DistreeError
    from distree.runtime.client import InferenceClient, infer_dataset
    from distree.runtime.data import load_inputs
    from distree.runtime.tls import load_tls
    from distree.serde import write_json_atomic
    from distree.workload import Load

    if rate is not None and clients is not None:
        raise DistreeError("give --rate (open loop) or --clients (closed loop), not both")
    load = Load(rate=rate) if rate is not None else Load(clients=clients or 1)
    with InferenceClient(address, timeout_s=timeout_s, tls=load_tls(tls_cert, tls_key, tls_ca)) as client:
        report = infer_dataset(client, load_inputs(input_path), deadline_ms=deadline_ms, limit=limit, load=load,
                               seed=seed)
    if json_path:
        write_json_atomic(json_path, report.to_dict())
    acc = f", accuracy {report.accuracy:.4f}" if report.accuracy is not None else ""
    e2e = report.end_to_end
    click.echo(f"{report.samples} samples via {' -> '.join(h.device for h in report.hops)}{acc}; end-to-end median "
               f"{e2e['median_ms']:.3f} ms, p90 {e2e['p90_ms']:.3f} ms, p99 {e2e['p99_ms']:.3f} ms")
    click.echo("exits: " + ", ".join(f"{k} {v:.1%}" for k, v in report.exit_rates.items()))
    if rate is not None or clients is not None:
        waited = (f"; arrival to send (every sender busy) mean {report.client_wait_ms['mean_ms']:.3f} ms, "
                  f"p99 {report.client_wait_ms['p99_ms']:.3f} ms" if rate is not None else "")
        click.echo(f"load {report.workload}{f' (seed {seed})' if rate is not None else ''}: answered "
                   f"{report.throughput_rps:.0f} req/s, mean {e2e['mean_ms']:.3f} ms{waited}")
    if deadline_ms is not None:
        click.echo(f"deadline {deadline_ms:g} ms: {report.deadline_exits} answered early from an exit, "
                   f"{report.deadline_missed} missed it")
    click.echo(f"  client <-> {address}: median {report.client_link['median_ms']:.3f} ms (network + framing)")
    for hop in report.hops:
        link = f", link to next median {hop.link['median_ms']:.3f} ms" if hop.link["count"] else ""
        click.echo(f"  {hop.device}: reached by {hop.reached}, compute median {hop.compute['median_ms']:.3f} ms, "
                   f"total median {hop.total['median_ms']:.3f} ms{link}")


@click.command("stats")
@click.argument("address")
@click.option("--timeout-s", type=POSITIVE, default=10.0, show_default=True, help="Longest wait for the counters.")
@click.option("--fail-on-drift", is_flag=True,
              help="Exit 1 when an exit's served share has drifted from the plan's, or a stage did not answer "
                   "(for a cron job or a monitor).")
@click.option("--json", "json_path", type=OUTPUT_FILE_OR_STDOUT, default=None,
              help="Write every stage's counters and the drift test as JSON here ('-': standard output).")
@click.option("--prometheus", "prometheus_path", type=OUTPUT_FILE, default=None,
              help="Write them in Prometheus' text format here, atomically (node_exporter's textfile collector).")
@tls_options
def stats_cmd(address: str, timeout_s: float, fail_on_drift: bool, json_path: Optional[str],
              prometheus_path: Optional[str], tls_cert: Optional[str], tls_key: Optional[str], tls_ca: Optional[str]) -> None:
    """What the pipeline served at ADDRESS (its source device) has done since its stages started, every stage's
    timings, and whether the exits its requests take still match the plan's shares (drift)."""
    from distree.runtime.client import InferenceClient
    from distree.runtime.stats import prometheus_text
    from distree.runtime.tls import load_tls
    from distree.serde import write_bytes_atomic, write_json_atomic

    with InferenceClient(address, timeout_s=timeout_s, tls=load_tls(tls_cert, tls_key, tls_ca)) as client:
        report = client.stats()
    if prometheus_path:
        write_bytes_atomic(prometheus_path, prometheus_text(report).encode())
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        if json_path:
            write_json_atomic(json_path, report.to_dict())
        _print_stats(report)
    if fail_on_drift and (report.drifted or report.unreachable):      # a stage not asked is not vouched for
        sys.exit(1)


def _print_stats(report) -> None:
    from distree.runtime.stats import FAILED, FORWARD, RECENT

    stages = report.stages
    click.echo(f"pipeline at {report.address}: {' -> '.join(s['device'] for s in stages)}; the plan expects "
               f"{stages[0].get('expected_latency_ms', 0.0):.3f} ms a request")
    for snap in stages:
        if "unreachable" in snap:
            click.echo(f"  {snap['device']} at {snap['address']}: did not answer ({snap['unreachable']})")
            continue
        totals = snap["totals"]
        role = "relays for the source" if snap["stage"] is None else f"stage {snap['stage'] + 1}"
        handled = sum(totals.values())
        here = handled - totals.get(FORWARD, 0) - totals.get(FAILED, 0)
        compute, total = snap["compute_ms"], snap["total_ms"]
        computed = ("" if snap["stage"] is None else
                    f"compute median {compute['median_ms']:.3f} ms, p99 {compute['p99_ms']:.3f}; ")
        click.echo(f"  {snap['device']} ({role}, up {snap['uptime_s']:.0f} s): {handled} requests, {here} answered "
                   f"here, {totals.get(FORWARD, 0)} handed on, {totals.get(FAILED, 0)} failed; newest "
                   f"{total['count']}: {computed}receipt to reply median {total['median_ms']:.3f} ms, p99 "
                   f"{total['p99_ms']:.3f}")
    if not report.drift:
        return
    click.echo(f"exits: share of the requests that reached the stage and were decided by the thresholds "
               f"(newest {RECENT} per stage), against the plan's (calibration data)")
    for d in report.drift:
        said = {"drift": f"DRIFT (z {d.z:+.1f})", "ok": "ok", "too few requests": "too few requests to tell"}
        click.echo(f"  {d.device} {d.exit}: plan {d.planned:.1%}, served {d.served:.1%} [{d.low:.1%}-{d.high:.1%}] "
                   f"of {d.requests}: {said[d.verdict]}")
    if report.served_ms is not None:
        change = report.served_ms / report.planned_ms - 1 if report.planned_ms else 0.0
        click.echo(f"by the bundle's figures (compute and transfers, no gRPC), a request costs "
                   f"{report.served_ms:.3f} ms at the served shares and {report.planned_ms:.3f} ms at the plan's "
                   f"({change:+.1%})")
    for device in dict.fromkeys(d.device for d in report.drifted):
        shares = ", ".join(f"{d.exit} {d.served:.1%} (plan {d.planned:.1%})" for d in report.drifted
                           if d.device == device)
        click.echo(f"drift on {device}: {shares}: these requests do not resemble the calibration data the plan was "
                   "made for, so latency and accuracy differ from its promise; label a sample of recent requests "
                   "and choose the thresholds again on it (`distree retune BUNDLE --data recent.npz -o BUNDLE`: no "
                   "compiling, two small files to copy), or compile again with it as --data")
