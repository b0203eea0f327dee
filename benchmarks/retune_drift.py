"""`distree retune` against drifted inputs: the current table and the retuned one, on the retune data and held out.

    .venv/bin/python benchmarks/retune_drift.py [--bundle bundle/] [--out FILE]

The bundle is README command 1's (compile it first). Test images 4,000-5,999, changed the way a camera's images
drift (as they are, blurred, noisy, brighter and flatter), are the labelled sample retune chooses the thresholds
on under the bundle's accuracy bound; test images 6,000-9,999, changed the same way, check both tables out of
sample with `distree run` (its shares and accuracy on the retune sample must equal what retune reports). Prints a table and writes
benchmarks/results/retune_drift.json (or FILE).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from distree.compiler.manifest import read_manifest  # noqa: E402
from distree.compiler.retune import BundleScorer, bundle_constraints, retune  # noqa: E402
from distree.exits.data import Dataset  # noqa: E402
from distree.runtime.executor import run_bundle  # noqa: E402

RETUNE_ON = slice(4000, 6000)
HELD_OUT = slice(6000, 10000)


def blurred(x: np.ndarray) -> np.ndarray:
    """Each pixel the mean of itself and its four neighbours (a defocused camera)."""
    return (x + np.roll(x, 1, 3) + np.roll(x, -1, 3) + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 5


DRIFTS = {
    "as they are": lambda x, rng: x,
    "blurred": lambda x, rng: blurred(x),
    "Gaussian noise, sigma 0.5": lambda x, rng: x + rng.normal(0.0, 0.5, x.shape),
    "brighter and flatter (x*0.6 + 0.5)": lambda x, rng: x * 0.6 + 0.5,
}


def full_model_accuracy(bundle: Path, data: Dataset) -> float:
    """The final classifier's on ``data``, as the bundle's own segments compute it."""
    return float(BundleScorer(bundle, read_manifest(bundle)).behaviour(data).correct[:, -1].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "retune_drift.json")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        sys.exit(f"{args.bundle}: no bundle; run README command 1 first")
    test = np.load(REPO / "examples" / "fashion_mnist" / "test.npz")
    x, y = test["x"], test["y"]
    constraints = bundle_constraints(read_manifest(args.bundle).plan)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, drift) in enumerate(DRIFTS.items()):
            rng = np.random.default_rng(k)
            sample = Dataset(drift(x[RETUNE_ON], rng).astype(np.float32), y[RETUNE_ON])
            held = Dataset(drift(x[HELD_OUT], rng).astype(np.float32), y[HELD_OUT])
            out = Path(tmp) / f"retuned{k}"
            t0 = time.perf_counter()
            result = retune(args.bundle, sample, out, constraints)
            wall = time.perf_counter() - t0
            for bundle, table in ((args.bundle, result.before), (out, result.after)):
                run = run_bundle(bundle, sample)
                assert run.exit_rates == table.exit_rates and abs(run.accuracy - table.accuracy) < 1e-12, name
            full_held = full_model_accuracy(args.bundle, held)
            rows.append({
                "drift": name, "full_model": result.full_model_accuracy, "required_correct": result.required_correct,
                "current": result.before.to_dict(), "retuned": result.after.to_dict(),
                "status": result.plan.status, "retune_s": wall,
                "held_out": {"samples": len(held.y), "full_model": full_held,
                             "bound": full_held - constraints.accuracy_drop,
                             "current": run_bundle(args.bundle, held).accuracy, "retuned": run_bundle(out, held).accuracy},
            })
    print(f"{'drift':36s} {'full':>6s} | {'current: acc, ms':>22s} | {'retuned: acc, ms':>24s} | held out: bound, "
          "current, retuned")
    for r in rows:
        cur, new, held = r["current"], r["retuned"], r["held_out"]
        miss = " MISSES" if not cur["meets_bound"] else ""
        print(f"{r['drift']:36s} {r['full_model']:6.4f} | {cur['accuracy']:.4f}, {cur['expected_ms']:.3f}{miss:7s} | "
              f"{new['accuracy']:.4f}, {new['expected_ms']:.3f} ({r['retune_s']:.1f} s) | {held['bound']:.4f}, "
              f"{held['current']:.4f}, {held['retuned']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "bundle": str(args.bundle),
                                    "accuracy_drop": constraints.accuracy_drop, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
