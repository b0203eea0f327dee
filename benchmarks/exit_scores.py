"""Exit quality on the Fashion-MNIST examples: per-exit test accuracy, and what each score kind buys.

    .venv/bin/python benchmarks/exit_scores.py [--models plain,exits] [--at 2,5,8] [--head auto|linear|conv]

For each example model: exits are found (``resnet_exits.onnx`` declares them) or trained after every
candidate block (``resnet_plain.onnx``; ``--at`` restricts them), each with its entry head. For each score
kind (max_softmax, entropy, stability) thresholds are chosen on the calibration split only, by two simple
rules (``RULES``; the solver does this properly): ``no_loss`` walks the exits in depth order and takes the
lowest grid level at which the samples still in that would leave are answered at least as well by the
exit as by the final classifier; ``per_exit`` looks at each exit alone and takes the lowest level whose
leaving samples are at least as accurate as the final classifier overall (it ignores that later exits
see only the harder samples). No such level: the exit is off. With those exits enabled (first passing
exit answers), the test set gives the share of images leaving at each exit and the accuracy drop
against the final classifier. Prints tables; writes benchmarks/results/exit_scores.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distree.exits import (  # noqa: E402
    SCORE_KINDS,
    Calibration,
    calibrate,
    declared_exits,
    evaluate,
    evaluate_arrays,
    load_dataset,
    run_exits,
    train_exits,
)
from distree.exits.heads import HEAD_KINDS, num_classes  # noqa: E402
from distree.graph import build_chain, load_model, model_sha256  # noqa: E402

EXAMPLE = ROOT / "examples" / "fashion_mnist"
MODELS = {"plain": EXAMPLE / "resnet_plain.onnx", "exits": EXAMPLE / "resnet_exits.onnx"}
OUT = ROOT / "benchmarks" / "results" / "exit_scores.json"


def thresholds_per_exit(cal: Calibration) -> dict[str, float | None]:
    """Per exit alone: the lowest grid level whose leaving samples are >= the final's overall accuracy."""
    scores, correct = cal.scores_array(), cal.correct_array()
    target = cal.final_accuracy()
    chosen: dict[str, float | None] = {}
    for j, name in enumerate(cal.exit_names):
        chosen[name] = next((t for t in cal.thresholds[j]
                             if (scores[:, j] >= t).any() and correct[scores[:, j] >= t, j].mean() >= target), None)
    return chosen


def thresholds_no_loss(cal: Calibration) -> dict[str, float | None]:
    """In depth order, on the samples still in: the lowest level at which the samples leaving at this exit
    are answered at least as well by the exit as by the final classifier (cascade-aware, greedy)."""
    scores, correct = cal.scores_array(), cal.correct_array()
    still_in = np.ones(cal.num_samples, dtype=bool)
    chosen: dict[str, float | None] = {}
    for j, name in enumerate(cal.exit_names):
        chosen[name] = None
        for t in cal.thresholds[j]:
            leave = still_in & (scores[:, j] >= t)
            if leave.any() and correct[leave, j].mean() >= correct[leave, -1].mean():
                chosen[name] = t
                still_in &= ~leave
                break
    return chosen


RULES = {"no_loss": thresholds_no_loss, "per_exit": thresholds_per_exit}


def measure(path: Path, calib_path: Path, test_path: Path, at: list[int] | None, head: str = "auto") -> dict:
    model = load_model(path)
    chain = build_chain(model)
    k = num_classes(model, chain)
    calib = load_dataset(calib_path, chain.input_shape, k)
    test = load_dataset(test_path, chain.input_shape, k)
    declared = declared_exits(model, chain) if at is None else ()
    started = time.perf_counter()
    exits_model, exits = train_exits(model, chain, calib, at=at, declared=declared, head=head)
    train_s = time.perf_counter() - started
    exits_chain = build_chain(exits_model)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    result = {"head": head, "model": str(shown), "model_file_sha256": model_sha256(path), "blocks": len(chain.blocks),
              "heads_train_s": round(train_s, 2),
              "exits": [{"name": e.name, "after_block": e.after_block, "source": e.source, "flops": e.flops,
                         "entry_flops": e.entry_flops, "fit_accuracy": e.fit_accuracy} for e in exits],
              "scores": {}}
    for score_kind in SCORE_KINDS:
        started = time.perf_counter()
        cal = calibrate(exits_model, exits_chain, exits, calib, score_kind, test_size=len(test))
        on_test = run_exits(exits_model, exits_chain, exits, test, score_kind)
        final_test = float(on_test.correct[:, -1].mean())
        result["scores"][score_kind] = {}
        for rule, choose in RULES.items():
            thresholds = choose(cal)
            on_cal = evaluate(cal, thresholds)
            ev = evaluate_arrays(on_test.scores, on_test.correct, [thresholds[n] for n in cal.exit_names],
                                 cal.exit_names)
            result["scores"][score_kind][rule] = {
                "thresholds": thresholds,
                "calibration": {"exit_rates": on_cal.exit_rates, "accuracy": on_cal.accuracy, "lcb95": on_cal.lcb},
                "test": {"exit_rates": ev.exit_rates, "accuracy": ev.accuracy,
                         "accuracy_drop": final_test - ev.accuracy, "lcb95": ev.lcb},
            }
        result["scores"][score_kind]["seconds"] = round(time.perf_counter() - started, 2)
    result["final_test_accuracy"] = final_test
    result["final_calibration_accuracy"] = cal.final_accuracy()
    result["split_sizes"] = cal.split_sizes
    result["exit_test_accuracy"] = {n: float(on_test.correct[:, j].mean()) for j, n in enumerate(cal.exit_names)}
    return result


def print_result(name: str, r: dict) -> None:
    print(f"\n== {name}: {r['model']}, {r['head']} heads ({r['blocks']} blocks, {len(r['exits'])} exits, heads "
          f"trained in {r['heads_train_s']} s; split {r['split_sizes']}) ==")
    print(f"final classifier: test {r['final_test_accuracy']:.4f}, calibration {r['final_calibration_accuracy']:.4f}")
    for rule in RULES:
        print(f"-- thresholds: {rule} --")
        print(f"{'exit':<10}{'block':>6}{'src':>9}{'test acc':>10}" + "".join(f"{k[:11]:>12}" for k in SCORE_KINDS)
              + "   <- test share leaving (exit off: -)")
        for e in r["exits"]:
            shares = []
            for kind in SCORE_KINDS:
                s = r["scores"][kind][rule]
                off = s["thresholds"][e["name"]] is None
                shares.append("-" if off else f"{s['test']['exit_rates'][e['name']]:.3f}")
            print(f"{e['name']:<10}{e['after_block']:>6}{e['source']:>9}{r['exit_test_accuracy'][e['name']]:>10.4f}"
                  + "".join(f"{x:>12}" for x in shares))
        print(f"{'final':<10}{'':>6}{'':>9}{r['final_test_accuracy']:>10.4f}"
              + "".join(f"{r['scores'][k][rule]['test']['exit_rates']['final']:>12.3f}" for k in SCORE_KINDS))
        for kind in SCORE_KINDS:
            s = r["scores"][kind][rule]
            early = 1.0 - s["test"]["exit_rates"]["final"]
            print(f"  {kind:<12} test: {early:.3f} leave early, accuracy {s['test']['accuracy']:.4f} "
                  f"(drop {s['test']['accuracy_drop'] * 100:+.2f} pts vs final); calibration: accuracy "
                  f"{s['calibration']['accuracy']:.4f}, LCB95 {s['calibration']['lcb95']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="plain,exits")
    parser.add_argument("--at", default=None, help="blocks for trained exits (default: all candidates / declared)")
    parser.add_argument("--head", default="auto", choices=HEAD_KINDS, help="shape of trained heads")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--calib", type=Path, default=EXAMPLE / "calib.npz")
    parser.add_argument("--test", type=Path, default=EXAMPLE / "test.npz")
    args = parser.parse_args()
    at = [int(b) for b in args.at.split(",")] if args.at else None
    results = {}
    for name in args.models.split(","):
        results[name] = measure(MODELS[name], args.calib, args.test, at, args.head)
        print_result(name, results[name])
    doc = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.system()}",
           "command": "python benchmarks/exit_scores.py " + " ".join(sys.argv[1:]),
           "threshold_rules": {name: " ".join(rule.__doc__.split()) for name, rule in RULES.items()},
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
