"""Does `distree simulate` predict what the served pipeline does under load? (on this machine)

    .venv/bin/python benchmarks/served_vs_simulated.py [--requests 1500] [--time-limit 20]

`resnet_exits` planned over two host "devices" of this machine (front holds too little memory for the whole
model, so the plan must hop; profile measured here, as in `predicted_vs_measured.py`), served with one
`distree serve` process per device on loopback, then driven by `distree infer` at Poisson rates (open loop:
a request's latency counts from its arrival) and by back-to-back requesters (closed loop). The same bundle
goes through `distree simulate --samples` replaying the same test images at the same loads. The simulator's
latency starts at the source device; a served request also pays the client's own hop to it, so the predicted
figure adds the client's hop as the profile has it for the load's gaps between requests (the source's `rpc`
round trip back to back for closed loops; for a rate, its `rpc:idle` curve averaged over the Poisson gaps), as
the simulator charges every other hop. The loads: 10-90% of the pipeline's closed-loop rate, and 20 req/s,
where nearly every request finds the pipeline idle (what `distree plan` charges by default, `--traffic sporadic`).

Each stage process's CPU time per request it received is read from /proc: what the profile's serve:receive /
serve:forward entries stand for, which the simulator charges as busy time on top of the compute. Caveat,
measured, not hidden: on loopback the client and both stages share this machine's cores, while the simulator
gives every device its own.
Prints a table; writes benchmarks/results/served_vs_simulated.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from predicted_vs_measured import EXAMPLE, ROOT, TWO_STAGE_TOPOLOGY, distree  # noqa: E402

from distree.compiler.manifest import read_manifest  # noqa: E402
from distree.profiler.items import IDLE_GAPS_MS, IDLE_RPC_ITEMS, RPC_ITEM  # noqa: E402
from distree.profiler.types import Profile  # noqa: E402
from distree.runtime.client import InferenceClient, infer_dataset  # noqa: E402
from distree.runtime.data import load_inputs  # noqa: E402
from distree.runtime.local import StageProcess  # noqa: E402
from distree.serde import write_json_atomic  # noqa: E402
from distree.workload import Load  # noqa: E402

RESULTS = BENCHMARKS / "results" / "served_vs_simulated.json"
RATE_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)     # of the served closed-loop throughput with CLIENTS requesters
LONE_RATE = 20.0                                # req/s: 50 ms apart on average, a lone request nearly every time
CLIENTS = 4


def build(work: Path, time_limit: float) -> Path:
    topology = work / "two_stage.yaml"
    topology.write_text(TWO_STAGE_TOPOLOGY)
    bundle = work / "bundle"
    distree("compile", str(EXAMPLE / "resnet_exits.onnx"), "--topology", str(topology), "--data",
            str(EXAMPLE / "calib.npz"), "-o", str(bundle), "--time-limit", str(time_limit))
    stages = [s.device for s in read_manifest(bundle).plan.stages]
    if stages != ["front", "back"]:
        raise SystemExit(f"expected a plan over front and back, got {stages}: adjust front's memory_gb")
    return bundle


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served(bundle: Path, loads: list[Load], requests: int) -> list[dict]:
    """One served run per load, each on the first ``requests`` test images, through one pair of servers; with
    each stage's CPU time per request it received (compute and everything around it)."""
    data = load_inputs(str(EXAMPLE / "test.npz"))
    back = StageProcess(bundle, "back", cwd=ROOT)
    try:
        front = StageProcess(bundle, "front", next_address=back.address, cwd=ROOT)
        try:
            with InferenceClient(front.address) as client:
                infer_dataset(client, data, limit=50)                       # warm streams and sessions
                rows = []
                for load in loads:
                    before = {s.device: cpu_s(s.proc.pid) for s in (front, back)}
                    report = infer_dataset(client, data, limit=requests, load=load)
                    reached = {h.device: h.reached for h in report.hops}
                    cpu = {s.device: (cpu_s(s.proc.pid) - before[s.device]) * 1e3 / max(reached.get(s.device, 0), 1)
                           for s in (front, back)}
                    rows.append({"load": load.label, "rate_rps": load.rate, "clients": load.clients,
                                 "end_to_end": report.end_to_end, "throughput_rps": report.throughput_rps,
                                 "client_wait": report.client_wait_ms, "accuracy": report.accuracy,
                                 "hops": [h.to_dict() for h in report.hops], "cpu_ms_per_request": cpu})
                    print(f"  served {load.label}: mean {report.end_to_end['mean_ms']:.3f} ms, "
                          f"{report.throughput_rps:.0f} req/s; CPU per request received: "
                          + ", ".join(f"{d} {ms:.3f} ms" for d, ms in cpu.items()), flush=True)
                return rows
        finally:
            front.stop()
    finally:
        back.stop()


def simulated(bundle: Path, loads: list[Load], requests: int, work: Path) -> dict:
    """`distree simulate` of the bundle's plan replaying the test images, at every load: the rates in one call
    (the CLI sweeps them), each closed loop in its own."""
    rates = ",".join(f"{ld.rate:g}" for ld in loads if ld.rate is not None)
    runs = ([["--rate", rates]] if rates else []) + [["--clients", str(ld.clients)] for ld in loads if ld.clients]
    points = []
    for flags in runs:
        out = work / "sim.json"
        distree("simulate", str(bundle), "--samples", str(EXAMPLE / "test.npz"), "--model",
                str(EXAMPLE / "resnet_exits.onnx"), "--no-baselines", "--requests", str(requests), *flags,
                "-o", str(out))
        (plan,) = [c for c in json.loads(out.read_text())["configurations"] if c["name"] == "plan"]
        points += plan["points"]
    return {"alone_mean_ms": plan["alone_mean_ms"], "saturation_rps": plan["saturation_rps"],
            "bottleneck": plan["bottleneck"], "busy_ms": plan["busy_ms"], "points": points}


def client_hop_ms(profile: Profile, device: str, load: Load) -> float:
    """The client's own hop to ``device`` as the profile prices it under ``load``: back to back for a closed loop,
    else its round trip after idle time (linear between the measured gaps, as the simulator charges each hop)
    averaged over Poisson gaps at the rate."""
    warm = profile.get(device, RPC_ITEM).median_ms
    if load.rate is None:
        return warm
    curve = [warm, *(profile.get(device, item).median_ms for item in IDLE_RPC_ITEMS)]
    gaps = np.random.default_rng(0).exponential(1000.0 / load.rate, 100_000)
    return float(np.interp(gaps, (0.0, *IDLE_GAPS_MS), curve).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = build(work, args.time_limit)
        plan = read_manifest(bundle).plan
        profile = Profile.load(bundle / "planning" / "profile.json")
        (probe,) = served(bundle, [Load(clients=CLIENTS)], args.requests)
        loads = [Load(rate=LONE_RATE)] + [Load(rate=round(f * probe["throughput_rps"])) for f in RATE_FRACTIONS]
        loads += [Load(clients=1), Load(clients=CLIENTS)]
        measured = served(bundle, loads, args.requests)
        model = simulated(bundle, loads, args.requests, work)
    by_label = {p["label"]: p for p in model["points"]}
    rows = []
    for m, load in zip(measured, loads):
        s = by_label[m["load"]]
        hop = client_hop_ms(profile, "front", load)
        rows.append({"load": m["load"], "served": m, "simulated": s, "client_hop_ms": hop,
                     "predicted_mean_ms": s["mean_ms"] + hop, "predicted_p99_ms": s["p99_ms"] + hop})
    client_hop = client_hop_ms(profile, "front", Load(rate=1e-3))
    print(f"\nplan: {plan.expected_latency_ms:.3f} ms from the source ({plan.traffic or 'steady'} traffic) + the "
          f"client's hop, {client_hop:.3f} ms for a lone request; "
          f"simulated saturation {model['saturation_rps']:.0f} req/s (busiest: {model['bottleneck']}, "
          f"{model['busy_ms'][model['bottleneck']]:.3f} ms a request)")
    print(f"{'Poisson load':>14} | {'predicted mean':>14} {'served mean':>11} {'ratio':>6} | {'pred. p99':>9} "
          f"{'served p99':>10} | {'served req/s':>12} | {'front CPU/req':>13}")
    for r in rows:
        sv = r["served"]
        if sv["rate_rps"] is None:
            continue
        print(f"{r['load']:>14} | {r['predicted_mean_ms']:14.3f} {sv['end_to_end']['mean_ms']:11.3f} "
              f"{r['predicted_mean_ms'] / sv['end_to_end']['mean_ms']:6.2f} | {r['predicted_p99_ms']:9.3f} "
              f"{sv['end_to_end']['p99_ms']:10.3f} | {sv['throughput_rps']:12.0f} | "
              f"{sv['cpu_ms_per_request']['front']:10.3f} ms")
    for r in rows:
        sv = r["served"]
        if sv["clients"] is not None:
            print(f"closed loop, {r['load']} back to back (each pays the client's hop, which the simulator's "
                  f"clients at the source do not): served {sv['throughput_rps']:.0f} req/s, mean "
                  f"{sv['end_to_end']['mean_ms']:.3f} ms; front CPU {sv['cpu_ms_per_request']['front']:.3f} ms "
                  f"a request, back {sv['cpu_ms_per_request']['back']:.3f}")
    write_json_atomic(args.out, {
        "kind": "benchmark", "benchmark": "served_vs_simulated", "requests": args.requests,
        "plan_ms": plan.expected_latency_ms, "client_hop_ms": client_hop, "simulation": model, "rows": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "command": f"benchmarks/served_vs_simulated.py --requests {args.requests} --time-limit {args.time_limit}",
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
