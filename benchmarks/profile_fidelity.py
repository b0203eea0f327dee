"""How far can the per-block profile be trusted? (a benchmark script, not a test)

For small CNNs at 1x1x28x28 (ResNet-20 class, the Fashion-MNIST example's; random weights: latency does
not depend on the values), measured on this machine with TVM (untuned) and ONNX Runtime, 1 thread:
  1. sum of per-block medians vs the whole backbone measured as one model (ratio),
  2. TVM vs ORT per block (ratio),
  3. the estimate model's error on this machine: fitted on one model, tested on the other (held out),
     and in-sample on both.
``--calibrate`` also refits the estimate on every measured row and writes
distree/profiler/estimate_calibration.json (the constants ``distree profile --estimate`` uses).

    .venv/bin/python benchmarks/profile_fidelity.py [--calibrate] [--rounds 5 --per-round 3]

Writes benchmarks/results/profile_fidelity.json and prints tables.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distree.exits import declared_exits  # noqa: E402
from distree.graph import build_chain, extract_segment, load_model  # noqa: E402
from distree.profiler import TimingSettings  # noqa: E402
from distree.profiler import estimate as est  # noqa: E402
from distree.profiler.profile import measure_unit  # noqa: E402
from distree.profiler.units import profile_units, unit_from_model  # noqa: E402
from distree.serde import write_json_atomic  # noqa: E402
from distree.targets import get_device, host_device  # noqa: E402


def build_models(folder: Path) -> dict[str, Path]:
    """ResNet-20 (16/32/64 channels) with two exits, and a wider ResNet-14 (32/64/128) with one."""
    import torch
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                      nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    class ResNet(nn.Module):
        def __init__(self, widths: tuple[int, int, int], per_stage: int, exits_after: tuple[int, ...]) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU())
            blocks, cin = [], widths[0]
            for s, w in enumerate(widths):
                for i in range(per_stage):
                    blocks.append(Basic(cin, w, 2 if (s > 0 and i == 0) else 1))
                    cin = w
            self.blocks = nn.ModuleList(blocks)
            self.exits_after = exits_after
            self.heads = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                     nn.Linear(blocks[i].body[3].out_channels, 10))
                                       for i in exits_after)
            self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))

        def forward(self, x):
            x = self.stem(x)
            outs = []
            for i, b in enumerate(self.blocks):
                x = b(x)
                if i in self.exits_after:
                    outs.append(self.heads[self.exits_after.index(i)](x))
            return (self.fc(x), *outs)

    specs = {"resnet20": ResNet((16, 32, 64), 3, (2, 5)), "wide-resnet14": ResNet((32, 64, 128), 2, (1,))}
    paths = {}
    for name, net in specs.items():
        torch.manual_seed(0)
        net.eval()
        path = folder / f"{name}.onnx"
        outputs = ["logits", *(f"exit_{k + 1}" for k in range(len(net.exits_after)))]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.randn(1, 1, 28, 28),), str(path), dynamo=False, input_names=["input"],
                              output_names=outputs, opset_version=17)
        paths[name] = path
    return paths


def measure_model(name: str, path: Path, rounds: int, per_round: int, cache: Path) -> dict:
    """Blocks, exit heads and the whole backbone, timed in interleaved rounds.

    The machine is shared: load drifts over minutes. Each round times every unit (and the whole backbone)
    a few times, so drift hits blocks and the whole model alike; medians are over all rounds.
    """
    host = host_device()
    model = load_model(path)
    chain = build_chain(model)
    exits = declared_exits(model, chain)
    units = list(profile_units(model, chain, exits))
    whole = unit_from_model("whole", extract_segment(model, chain, 0, len(chain.blocks) - 1),
                            sum(b.flops for b in chain.blocks))
    timing = TimingSettings(warmup=1, repeats=per_round)
    samples: dict[tuple[str, str], list[float]] = {}
    memory: dict[str, int] = {}
    t0 = time.perf_counter()
    for _ in range(rounds):
        for unit in [*units, whole]:
            for m in measure_unit(unit, ("tvm", "ort"), host, timing, cache):
                samples.setdefault((unit.item, m.backend), []).extend(m.samples_ms)
                memory[unit.item] = m.memory_bytes
    wall_s = time.perf_counter() - t0
    med = {k: float(np.median(v)) for k, v in samples.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in samples.items()}
    rows = [{"item": u.item, "ops": u.num_ops, "flops": u.flops, "dense_flops": u.dense_flops,
             "bytes": est.unit_bytes(u),
             "tvm_ms": med[(u.item, "tvm")], "ort_ms": med[(u.item, "ort")], "tvm_p90_ms": p90[(u.item, "tvm")],
             "ort_p90_ms": p90[(u.item, "ort")], "memory_bytes": memory[u.item]} for u in units]
    blocks = [r for r in rows if r["item"].startswith("block:")]
    whole_m = {b: med[("whole", b)] for b in ("tvm", "ort")}
    sums = {b: sum(r[f"{b}_ms"] for r in blocks) for b in ("tvm", "ort")}
    ratios = np.array([r["tvm_ms"] / r["ort_ms"] for r in blocks])
    heavy = np.array([r["tvm_ms"] / r["ort_ms"] for r in blocks if r["flops"] > 1e6])
    return {"model": name, "blocks": len(chain.blocks), "exits": len(exits), "wall_s": round(wall_s, 1),
            "samples_per_item": rounds * per_round, "whole_ms": whole_m, "sum_of_blocks_ms": sums,
            "sum_over_whole": {b: sums[b] / whole_m[b] for b in sums},
            "tvm_over_ort_per_block": {"median": float(np.median(ratios)), "min": float(ratios.min()),
                                       "max": float(ratios.max()),
                                       "median_blocks_over_1_mflop": float(np.median(heavy))},
            "rows": rows}


def fit_rows(results: list[dict], backend: str) -> list[est.Row]:
    return [(r["dense_flops"], r["flops"] - r["dense_flops"], r["bytes"], r["ops"], r[f"{backend}_ms"])
            for res in results for r in res["rows"]]


def _estimates(res: dict, dev, coef: est.EstimateCoefficients, threads: int):
    """(item, estimated ms) for the model's blocks on ``dev``."""
    for r in res["rows"]:
        if r["item"].startswith("block:"):
            yield r["item"], est.estimate_ms(r["dense_flops"], r["flops"] - r["dense_flops"], r["bytes"], r["ops"],
                                             dev, coef, threads)


def errors(coef: est.EstimateCoefficients, rows, threads: int) -> dict:
    host = host_device()
    rel = np.array([abs(est.estimate_ms(d, o, b, n, host, coef, threads) - ms) / ms for d, o, b, n, ms in rows])
    return {"median_rel_error": float(np.median(rel)), "max_rel_error": float(rel.max()), "rows": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="refit and write estimate_calibration.json")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all units")
    parser.add_argument("--per-round", type=int, default=3, help="samples per unit and backend in each round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/profile_fidelity.json")
    args = parser.parse_args()
    timing = TimingSettings()  # threads = 1, as the profiler's default
    host = host_device()
    with tempfile.TemporaryDirectory(prefix="distree-fidelity-") as tmp:
        paths = build_models(Path(tmp))
        results = [measure_model(name, path, args.rounds, args.per_round, Path(tmp) / "cache")
                   for name, path in paths.items()]

    estimate_report = {}
    for backend in ("ort", "tvm"):
        train, test = fit_rows(results[:1], backend), fit_rows(results[1:], backend)
        coef = est.fit_coefficients(backend, train, host, timing.threads)
        backbone = {res["model"]: sum(ms for _, ms in _estimates(res, host, coef, timing.threads))
                    / res["sum_of_blocks_ms"][backend] - 1 for res in results}
        estimate_report[backend] = {"fit_on": results[0]["model"], "coefficients": coef.to_dict(),
                                    "in_sample": errors(coef, train, timing.threads),
                                    "held_out": {"model": results[1]["model"], **errors(coef, test, timing.threads)},
                                    "backbone_sum_rel_error": backbone}
    command = "python benchmarks/profile_fidelity.py --calibrate"
    if args.calibrate:
        coefs = tuple(est.fit_coefficients(b, fit_rows(results, b), host, timing.threads) for b in ("tvm", "ort"))
        machine = f"{platform.machine()} {host.description.removeprefix('this machine: ')}"
        cal = est.EstimateCalibration(machine=machine, command=command,
                                      threads=timing.threads, coefficients=coefs)
        write_json_atomic(est.CALIBRATION_FILE, cal.to_dict())
        estimate_report["written"] = str(est.CALIBRATION_FILE.relative_to(ROOT))

    device_estimates = {}
    if est.CALIBRATION_FILE.is_file():
        cal = est.load_calibration()
        for res in results:
            device_estimates[res["model"]] = {}
            for name in ("host", "pi4", "pi5", "jetson-orin-nano"):
                dev = get_device(name)
                total = {b: sum(ms for *_, ms in _estimates(res, dev, cal.for_backend(b), timing.threads))
                         for b in ("tvm", "ort")}
                device_estimates[res["model"]][name] = total

    doc = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "machine": f"{platform.machine()} {host.description}, shared and loaded (2 cores, several users)",
           "timing": {"rounds": args.rounds, "per_round": args.per_round, "threads": timing.threads,
                      "min_repeat_ms": timing.min_repeat_ms}, "models": results, "estimate": estimate_report,
           "estimated_backbone_ms_by_device": device_estimates}
    write_json_atomic(args.out, doc)
    _print(doc)


def _print(doc: dict) -> None:
    print(f"machine: {doc['machine']}")
    print(f"{'model':<15}{'blocks':>7}{'backend':>8}{'whole ms':>10}{'sum ms':>9}{'sum/whole':>10}")
    for res in doc["models"]:
        for b in ("tvm", "ort"):
            print(f"{res['model']:<15}{res['blocks']:>7}{b:>8}{res['whole_ms'][b]:>10.3f}"
                  f"{res['sum_of_blocks_ms'][b]:>9.3f}{res['sum_over_whole'][b]:>10.2f}")
    print("\nTVM (untuned) / ORT per block:")
    for res in doc["models"]:
        r = res["tvm_over_ort_per_block"]
        print(f"  {res['model']:<15} median {r['median']:.2f}x (blocks > 1 MFLOP: "
              f"{r['median_blocks_over_1_mflop']:.2f}x)  min {r['min']:.2f}x  max {r['max']:.2f}x")
    print("\nestimate error on this machine (relative, per item):")
    for backend in ("ort", "tvm"):
        e = doc["estimate"][backend]
        print(f"  {backend}: fit on {e['fit_on']}: in-sample median {e['in_sample']['median_rel_error']:.0%} "
              f"max {e['in_sample']['max_rel_error']:.0%}; held-out {e['held_out']['model']}: median "
              f"{e['held_out']['median_rel_error']:.0%} max {e['held_out']['max_rel_error']:.0%}; sum over blocks: "
              + ", ".join(f"{m} {v:+.0%}" for m, v in e["backbone_sum_rel_error"].items()))
    if doc["estimated_backbone_ms_by_device"]:
        print("\nestimated backbone latency (sum of blocks, ms, 1 thread) by device:")
        for model, by_dev in doc["estimated_backbone_ms_by_device"].items():
            print(f"  {model}: " + ", ".join(f"{d} tvm {v['tvm']:.2f} / ort {v['ort']:.2f}"
                                            for d, v in by_dev.items()))


if __name__ == "__main__":
    main()
