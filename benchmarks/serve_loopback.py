"""The example bundle served over gRPC on loopback (one process per device) vs ``run_bundle`` in process:
end-to-end latency p50/p90/p99, throughput, and what each gRPC hop costs.

    .venv/bin/python benchmarks/serve_loopback.py [--samples 1000] [--netem]

Two bundles of the Fashion-MNIST example (ONNX Runtime segments, batch 1, 1 thread each):
- ``compiled``: what `distree compile --topology examples/fashion_mnist/topology.yaml --backend ort` plans.
  Since the plan counts a hop's gRPC software, it cuts after the first exit (pi4 -> jetson); before, it put
  every block on the Jetson with the Pi 4 (the source) as a relay, two gRPC calls for every request.
- ``split``: the same model cut by hand after the plan's last exit: pi4 runs the blocks up to it with both
  exits, the Jetson the rest, so requests that leave early take one hop and the others two.

Served answers must equal run_bundle's (checked). Overhead per hop = (end-to-end - compute on every stage)
/ gRPC calls of that request: framing, the gRPC stack both ways, thread hand-offs. For scale, the round trip
of one request frame to a bare gRPC echo server in another process is measured too, as a unary call and on an
open stream (how distree's stages and client send requests: `distree.runtime.link`).

``--tls``: also the ``split`` bundle with mutual TLS on every hop (certificates made with the README's openssl
recipe; without openssl it says so loudly and records why).

``--netem``: also the ``split`` bundle across two network namespaces joined by a veth pair shaped with
``tc netem`` to the topology's link (delay, jitter, rate). It needs root and the kernel's sch_netem; when
either is missing it says so loudly and records why in the JSON (never a silent skip).
Writes benchmarks/results/serve_loopback.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from distree.compiler.bundle import build_bundle
from distree.compiler.pipeline import CompileOptions, compile_model
from distree.exits import calibrate, declared_exits, load_dataset
from distree.graph import build_chain, load_model
from distree.runtime.backends import percentiles_ms
from distree.runtime.client import InferenceClient
from distree.runtime.executor import run_bundle
from distree.runtime.local import StageProcess
from distree.serde import write_json_atomic
from distree.targets import load_topology

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "fashion_mnist"
TOPOLOGY = EXAMPLE / "topology.yaml"
RESULTS = Path(__file__).parent / "results" / "serve_loopback.json"
IN_FLIGHT = 4                       # concurrent requests for the pipelined throughput figure


def build_bundles(work: Path) -> dict[str, Path]:
    """Both bundles, built in a child process so that the measuring process carries no compile-time state
    (calibration sessions and arrays measurably slowed the served runs measured from the same process)."""
    subprocess.run([sys.executable, __file__, "--build-only", "--work", str(work)], check=True, cwd=REPO)
    return {"compiled": work / "compiled", "split": work / "split"}


def _build(work: Path) -> None:
    compiled = compile_model(EXAMPLE / "resnet_exits.onnx", EXAMPLE / "calib.npz", work / "compiled",
                             CompileOptions(topology=TOPOLOGY, backend="ort"), cache_dir=work / "cache")
    model = load_model(EXAMPLE / "resnet_exits.onnx")
    chain = build_chain(model)
    calibration = calibrate(model, chain, declared_exits(model, chain),
                            load_dataset(EXAMPLE / "calib.npz", chain.input_shape), score_kind=compiled.plan.score_kind)
    split_after_last_exit(compiled.plan, model, chain, calibration, load_topology(TOPOLOGY), work / "split", "ort")


def split_after_last_exit(plan, model, chain, calibration, topology, out: Path, backend: str) -> Path:
    """A two-stage bundle of ``plan``'s exits: the topology's source runs the blocks up to the last exit with
    every exit, the other device the rest."""
    exits = tuple(sorted((c for st in plan.stages for c in st.exits), key=lambda c: c.after_block))
    cut = exits[-1].after_block
    other = next(d.name for d in topology.devices if d.name != topology.source_device)
    first = dataclasses.replace(plan.stages[0], device=topology.source_device, first_block=0, last_block=cut,
                                exits=exits, transfer_in_ms=0.0, reach_rate=1.0)
    second = dataclasses.replace(plan.stages[0], device=other, first_block=cut + 1, last_block=len(chain.blocks) - 1,
                                 exits=(), reach_rate=max(1.0 - sum(c.exit_rate for c in exits), 1e-6))
    split = dataclasses.replace(plan, stages=(first, second), solver="hand split (benchmark)")
    return build_bundle(model, chain, split, topology, calibration, out, backend=backend)


def start_pipeline(bundle: Path, host: str = "127.0.0.1", prefixes: Optional[dict[str, tuple[str, ...]]] = None,
                   hosts: Optional[dict[str, str]] = None, extra_args: tuple[str, ...] = ()) -> list[StageProcess]:
    """One server per device, last first (each needs its successor's address); the source's is first."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    devices = [st["name"] for st in manifest["stages"]]
    if manifest["source"] not in devices:
        devices.insert(0, manifest["source"])         # the source relays to the first stage
    servers: list[StageProcess] = []
    next_address = None
    try:
        for device in reversed(devices):
            listen = f"{(hosts or {}).get(device, host)}:0"
            servers.insert(0, StageProcess(bundle, device, listen, next_address, extra_args=extra_args,
                                           prefix=(prefixes or {}).get(device, ()), cwd=REPO))
            next_address = servers[0].address
    except Exception:
        for s in servers:
            s.stop()
        raise
    return servers


def measure_in_process(bundle: Path, data) -> dict:
    report = run_bundle(bundle, data)
    total_s = report.end_to_end["mean_ms"] * report.samples / 1e3
    return {"end_to_end": report.end_to_end, "throughput_rps": report.samples / total_s,
            "predictions": list(report.predictions), "exits": list(report.exits), "accuracy": report.accuracy}


def measure_served(address: str, data, tls=None) -> dict:
    with InferenceClient(address, tls=tls) as client:
        for i in range(min(20, len(data.x))):                   # warm channels and sessions
            client.infer(data.x[i])
        replies, latency = [], []
        started = time.perf_counter()
        for i in range(len(data.x)):
            t0 = time.perf_counter()
            replies.append(client.infer(data.x[i]))
            latency.append((time.perf_counter() - t0) * 1e3)
        sequential_s = time.perf_counter() - started
        started = time.perf_counter()
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            list(pool.map(client.infer, data.x))
        pipelined_s = time.perf_counter() - started
    calls = [len(r.hops) for r in replies]
    per_hop = [(ms - sum(h.compute_ms for h in r.hops)) / len(r.hops) for ms, r in zip(latency, replies)]
    links = [h.forward_ms - r.hops[k + 1].total_ms for r in replies for k, h in enumerate(r.hops[:-1])]
    return {"end_to_end": percentiles_ms(latency), "throughput_rps": len(latency) / sequential_s,
            f"throughput_rps_{IN_FLIGHT}_in_flight": len(latency) / pipelined_s,
            "grpc_calls_per_request": float(np.mean(calls)), "overhead_per_hop": percentiles_ms(per_hop),
            "client_link": percentiles_ms([ms - r.hops[0].total_ms for ms, r in zip(latency, replies)]),
            "stage_to_stage_link": percentiles_ms(links),
            "predictions": [r.prediction for r in replies], "exits": [r.exit for r in replies],
            "reasons": sorted(set(r.reason for r in replies))}


def echo_server() -> None:
    """A bare gRPC echo (same generic-handler server setup, no work): the floor a hop cannot go below, as a
    unary call and on an open stream (what distree's link uses)."""
    import grpc

    server = grpc.server(ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda data, _ctx: data),
        "EchoStream": grpc.stream_stream_rpc_method_handler(lambda frames, _ctx: iter(frames))}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()


def measure_echo(x: np.ndarray, count: int) -> dict:
    """Round trips of one request frame to a bare echo server in another process: unary, then on a stream."""
    import grpc

    from distree.runtime.link import Link
    from distree.runtime.wire import Request, encode_request

    proc = subprocess.Popen([sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True)
    try:
        port = proc.stdout.readline().strip()
        frame = encode_request(Request("0", "echo", "input", None, 0.0, x[:1]))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            link = Link(channel, "/echo/Echo", "/echo/EchoStream")
            unary = channel.unary_unary("/echo/Echo")
            result = {"frame_bytes": len(frame)}
            for name, call in (("unary", lambda: unary(frame, timeout=10)), ("stream", lambda: link.call(frame, 10))):
                for _ in range(20):
                    call()
                times = []
                for _ in range(count):
                    t0 = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - t0) * 1e3)
                result[name] = percentiles_ms(times)
            link.close()
        return result
    finally:
        proc.kill()
        proc.wait()


OPENSSL_RECIPE = (  # README "Serving over gRPC": one CA, then a certificate per device and client
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 -subj /CN=distree-ca "
    "-keyout ca.key -out ca.pem",
    "openssl req -x509 -CA ca.pem -CAkey ca.key -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 "
    "-subj /CN={name} -addext basicConstraints=CA:FALSE -addext subjectAltName=IP:127.0.0.1,DNS:localhost "
    "-keyout {name}.key -out {name}.crt",
)


def tls_run(bundle: Path, data, work: Path) -> dict:
    """The bundle with mutual TLS on every hop; {'done': False, 'reason': ...} without openssl."""
    from distree.runtime.tls import load_tls

    folder = work / "tls"
    folder.mkdir(parents=True, exist_ok=True)
    commands = [OPENSSL_RECIPE[0]] + [OPENSSL_RECIPE[1].format(name=n) for n in ("stage", "client")]
    for cmd in commands:
        try:
            proc = subprocess.run(shlex.split(cmd), cwd=folder, capture_output=True, text=True)
        except FileNotFoundError:
            return {"done": False, "reason": "openssl is not installed (apt-get install openssl)"}
        if proc.returncode != 0:
            return {"done": False, "reason": f"`{cmd}` failed: {proc.stderr.strip()}"}
    flags = ("--tls-cert", str(folder / "stage.crt"), "--tls-key", str(folder / "stage.key"),
             "--tls-ca", str(folder / "ca.pem"))
    servers = start_pipeline(bundle, extra_args=flags)
    try:
        tls = load_tls(str(folder / "client.crt"), str(folder / "client.key"), str(folder / "ca.pem"))
        served = measure_served(servers[0].address, data, tls=tls)
    finally:
        for s in servers:
            s.stop()
    return {"done": True, **{k: v for k, v in served.items() if k not in ("predictions", "exits")}}


def shaped_run(bundle: Path, data_path: Path, samples: int) -> dict:
    """The split bundle across two namespaces on a netem-shaped veth; {'done': False, 'reason': ...} if not possible."""
    topology = load_topology(TOPOLOGY)
    link = topology.links[0]
    ns = {link.src: "distree_src", link.dst: "distree_dst"}
    ips = {link.src: "10.77.0.1", link.dst: "10.77.0.2"}
    veth = {link.src: "dtveth0", link.dst: "dtveth1"}
    netem = f"delay {link.latency_ms}ms {link.jitter_ms}ms rate {link.bandwidth_mbps}mbit"
    setup = [f"ip netns add {ns[link.src]}", f"ip netns add {ns[link.dst]}",
             f"ip link add {veth[link.src]} type veth peer name {veth[link.dst]}"]
    for dev in (link.src, link.dst):
        setup += [f"ip link set {veth[dev]} netns {ns[dev]}", f"ip -n {ns[dev]} addr add {ips[dev]}/24 dev {veth[dev]}",
                  f"ip -n {ns[dev]} link set {veth[dev]} up", f"ip -n {ns[dev]} link set lo up",
                  f"ip netns exec {ns[dev]} tc qdisc add dev {veth[dev]} root netem {netem}"]
    try:
        if os.geteuid() != 0:
            return {"done": False, "reason": "not root: creating network namespaces needs root (sudo)"}
        for cmd in setup:
            proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
            if proc.returncode != 0:
                return {"done": False, "reason": f"`{cmd}` failed: {proc.stderr.strip()}"}
        prefixes = {dev: ("ip", "netns", "exec", name) for dev, name in ns.items()}
        servers = start_pipeline(bundle, prefixes=prefixes, hosts=ips)
        try:
            out = Path("/tmp") / f"distree-serve-netem-{os.getpid()}.json"
            proc = subprocess.run([*prefixes[link.src], sys.executable, "-m", "distree", "infer", servers[0].address,
                                   "--input", str(data_path), "--limit", str(samples), "--json", str(out)],
                                  cwd=REPO, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                return {"done": False, "reason": f"distree infer failed: {proc.stderr.strip()}"}
            report = json.loads(out.read_text())
            out.unlink()
            return {"done": True, "netem": netem, "end_to_end": report["end_to_end"], "hops": report["hops"],
                    "client_link": report["client_link"]}
        finally:
            for s in servers:
                s.stop()
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/distree-serve-loopback"))
    parser.add_argument("--netem", action="store_true", help="also run the split bundle over a netem-shaped link")
    parser.add_argument("--tls", action="store_true", help="also run the split bundle with mutual TLS on every hop")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        return echo_server()
    if args.build_only:
        return _build(args.work)
    load_start = os.getloadavg()
    test_path = EXAMPLE / "test.npz"
    if not test_path.is_file():
        subprocess.run([sys.executable, str(EXAMPLE / "make_data.py")], check=True)
    full = load_dataset(test_path)
    data = type(full)(x=full.x[:args.samples], y=full.y[:args.samples])
    bundles = build_bundles(args.work)
    results: dict[str, dict] = {}
    for name, bundle in bundles.items():
        in_process = measure_in_process(bundle, data)
        servers = start_pipeline(bundle)
        try:
            served = measure_served(servers[0].address, data)
        finally:
            for s in servers:
                s.stop()
        same = served["predictions"] == in_process["predictions"] and served["exits"] == in_process["exits"]
        if not same:
            raise SystemExit(f"{name}: served answers differ from run_bundle's")
        path = [json.loads((bundle / "manifest.json").read_text())["source"]]
        path += [st.name for st in _stages(bundle) if st.name != path[0]]
        results[name] = {"bundle": str(bundle), "pipeline": path, "answers_equal_run_bundle": same,
                         "accuracy": in_process["accuracy"],
                         "in_process": {k: v for k, v in in_process.items() if k not in ("predictions", "exits")},
                         "served": {k: v for k, v in served.items() if k not in ("predictions", "exits")}}
    echo = measure_echo(data.x, len(data.x))
    tls = tls_run(bundles["split"], data, args.work) if args.tls else None
    if tls is not None and not tls["done"]:
        print(f"{'!' * 100}\nTLS RUN NOT DONE: {tls['reason']}\n{'!' * 100}", file=sys.stderr)
    shaped = None
    if args.netem:
        shaped = shaped_run(bundles["split"], test_path, args.samples)
        if not shaped["done"]:
            banner = "!" * 100
            msg = f"{banner}\nSHAPED-LINK RUN NOT DONE: {shaped['reason']}\n{banner}"
            print(msg, file=sys.stderr)
            print(msg)
    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
           "command": " ".join([".venv/bin/python", "benchmarks/serve_loopback.py", *sys.argv[1:]]),
           "samples": len(data.x), "in_flight": IN_FLIGHT, "results": results, "grpc_echo_round_trip": echo,
           "shaped_link": shaped, "split_mutual_tls": tls}
    _print_table(doc)
    write_json_atomic(RESULTS, doc)
    print(f"wrote {RESULTS}")


def _stages(bundle: Path):
    from distree.compiler.manifest import read_manifest

    return read_manifest(bundle).stages


def _print_table(doc: dict) -> None:
    print(f"{doc['samples']} Fashion-MNIST test images, batch 1; load average {doc['machine']['loadavg_start']}")
    head = (f"{'bundle':9} {'path':22} {'mode':10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>8} "
            f"{'req/s x' + str(doc['in_flight']):>9} {'calls':>6} {'ovh/hop p50':>12}")
    print(head)
    print("-" * len(head))
    pipelined = f"throughput_rps_{doc['in_flight']}_in_flight"
    for name, r in doc["results"].items():
        path = "->".join(d.split("-")[0] for d in r["pipeline"])
        ip, sv = r["in_process"], r["served"]
        print(f"{name:9} {path:22} {'in-proc':10} {ip['end_to_end']['median_ms']:8.3f} {ip['end_to_end']['p90_ms']:8.3f} "
              f"{ip['end_to_end']['p99_ms']:8.3f} {ip['throughput_rps']:8.0f} {'':>9} {'':>6} {'':>12}")
        _print_served("gRPC", sv, pipelined)
        if name == "split" and doc["split_mutual_tls"] and doc["split_mutual_tls"]["done"]:
            _print_served("gRPC+mTLS", doc["split_mutual_tls"], pipelined)
    echo = doc["grpc_echo_round_trip"]
    print(f"bare gRPC echo of one {echo['frame_bytes']}-byte request frame (another process), p50 / p90: unary "
          f"{echo['unary']['median_ms']:.3f} / {echo['unary']['p90_ms']:.3f} ms, on an open stream (distree's link) "
          f"{echo['stream']['median_ms']:.3f} / {echo['stream']['p90_ms']:.3f} ms")
    shaped = doc["shaped_link"]
    if shaped and shaped["done"]:
        e = shaped["end_to_end"]
        print(f"split over netem ({shaped['netem']}): p50 {e['median_ms']:.3f} ms, p90 {e['p90_ms']:.3f} ms")


def _print_served(mode: str, sv: dict, pipelined: str) -> None:
    print(f"{'':9} {'':22} {mode:10} {sv['end_to_end']['median_ms']:8.3f} {sv['end_to_end']['p90_ms']:8.3f} "
          f"{sv['end_to_end']['p99_ms']:8.3f} {sv['throughput_rps']:8.0f} "
          f"{sv[pipelined]:9.0f} {sv['grpc_calls_per_request']:6.2f} "
          f"{sv['overhead_per_hop']['median_ms']:12.3f}")


if __name__ == "__main__":
    main()
