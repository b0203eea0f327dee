"""The example's plan against its baselines under load, in the discrete-event simulator.

    .venv/bin/python benchmarks/simulate_example.py [--accuracy-drop 0.01] [--requests 10000]

Inputs are what `distree compile examples/fashion_mnist/resnet_exits.onnx --topology
examples/fashion_mnist/topology.yaml --data calib.npz` computes: the model's three declared exits calibrated on
the threshold split of calib.npz, device costs from the profiler's ESTIMATE mode for the Pi 4 and the Jetson
Orin Nano (no such boards here: the latencies are model-based figures, not measurements), the example's
gigabit topology, and the solver's plan. Requests replay the 10,000 Fashion-MNIST test images (exits decided
by each image's own scores), Poisson arrivals at fractions of the plan's capacity. Three what-ifs: the
gigabit link replaced by Wi-Fi (same plan, then re-planned), and the Orin removed (re-planned on the Pi alone).
Prints tables; writes benchmarks/results/simulate_example.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distree.exits import calibrate, declared_exits, load_dataset  # noqa: E402
from distree.graph import build_chain, load_model  # noqa: E402
from distree.profiler import merge_profiles, profile_model  # noqa: E402
from distree.serde import write_json_atomic  # noqa: E402
from distree.sim import Inputs, held_out_samples, simulate  # noqa: E402
from distree.workload import Load  # noqa: E402
from distree.sim.report import print_report  # noqa: E402
from distree.solver import Constraints, solve  # noqa: E402
from distree.targets import load_topology, topology_from_dict  # noqa: E402

EXAMPLE = ROOT / "examples" / "fashion_mnist"
RESULTS = ROOT / "benchmarks" / "results" / "simulate_example.json"
FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 1.1)
WIFI = {"bandwidth_mbps": 100.0, "latency_ms": 2.0, "jitter_ms": 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accuracy-drop", type=float, default=0.01)
    ap.add_argument("--requests", type=int, default=None, help="per run (default: one pass over the test set)")
    args = ap.parse_args()
    calib, test = EXAMPLE / "calib.npz", EXAMPLE / "test.npz"
    if not (calib.is_file() and test.is_file()):
        sys.exit(f"{calib} / {test} missing: run .venv/bin/python {EXAMPLE / 'make_data.py'} first")
    timings = {}
    t0 = time.perf_counter()
    model_path = EXAMPLE / "resnet_exits.onnx"
    model = load_model(model_path)
    chain = build_chain(model)
    exits = declared_exits(model, chain)
    calibration = calibrate(model, chain, exits, load_dataset(calib, chain.input_shape), score_kind="max_softmax")
    topology = load_topology(EXAMPLE / "topology.yaml")
    profile = merge_profiles([profile_model(model, chain, exits, dev, mode="estimate") for dev in topology.devices])
    timings["inputs_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = solve(chain, calibration, profile, topology, Constraints(accuracy_drop=args.accuracy_drop,
                                                                    time_limit_s=60))
    timings["solve_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = held_out_samples(calibration, chain, model_path, test)
    timings["score_test_set_s"] = time.perf_counter() - t0
    inputs = Inputs(chain, calibration, profile, topology, samples, f"{test.name} (10,000 test images)")

    runs = {}
    t0 = time.perf_counter()
    probe = simulate(plan, inputs, loads=[Load(rate=1.0)], requests=1, baselines=False)
    capacity = probe.configurations[0].saturation_rps
    loads = [Load(rate=round(f * capacity, 3)) for f in FRACTIONS]
    runs["gigabit"] = simulate(plan, inputs, loads=loads, requests=args.requests, plan_label="example plan")
    timings["simulate_s"] = time.perf_counter() - t0
    n_runs = len(runs["gigabit"].configurations) * len(loads)
    timings["simulated_requests"] = n_runs * (args.requests or samples.num_samples)

    wifi_doc = {"devices": [d.name for d in topology.devices], "source": topology.source_device,
                "links": [{"src": topology.devices[0].name, "dst": topology.devices[1].name, **WIFI}]}
    wifi = dataclasses.replace(inputs, topology=topology_from_dict(wifi_doc, where="wifi what-if"))
    runs["wifi-same-plan"] = simulate(plan, wifi, loads=loads, requests=args.requests, baselines=False,
                                      plan_label="example plan, Wi-Fi link")
    runs["wifi-replanned"] = simulate(plan, wifi, loads=loads, requests=args.requests, replan=True,
                                      baselines=False, plan_label="example plan, Wi-Fi link")
    pi_only = topology_from_dict({"devices": [topology.source_device]}, where="pi4-only what-if")
    runs["pi4-only"] = simulate(plan, dataclasses.replace(inputs, topology=pi_only), loads=loads,
                                requests=args.requests, baselines=False, plan_label="example plan, Orin removed")
    for name, report in runs.items():
        print(f"\n=== {name} ===")
        print_report(report)

    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "load_average": os.getloadavg(),
           "provenance": sorted({m.provenance for m in profile.entries}), "plan": plan.to_dict(),
           "timings": {k: round(v, 2) for k, v in timings.items()},
           "runs": {name: report.to_dict() for name, report in runs.items()}}
    write_json_atomic(RESULTS, doc)
    print(f"\nwrote {RESULTS} ({timings})")


if __name__ == "__main__":
    main()
