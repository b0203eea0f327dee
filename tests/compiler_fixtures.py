"""A tiny multi-exit CNN (real ONNX, real data shapes) and a hand-made plan over it, for the compiler tests.

The plan is built here rather than by the solver so these tests exercise the build/runtime alone; the
end-to-end test (`tests/test_compile_e2e.py`) runs the real chain including the solver.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from distree.exits import Dataset, calibrate, declared_exits, exit_scores
from distree.exits.types import Calibration
from distree.graph import Chain, build_chain, load_model
from distree.runtime.executor import FINAL
from distree.solver.plan import ExitChoice, Plan, Stage
from distree.targets import get_device
from distree.targets.spec import Topology

SHAPE = (1, 1, 16, 16)


class TinyExits(nn.Module):
    """Stem + three conv blocks; exit heads after blocks 1 and 2 (extra outputs exit_1, exit_2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.e1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.e2 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        h1 = self.b1(self.stem(x))
        h2 = self.b2(h1)
        return self.head(self.b3(h2)), self.e1(h1) * 4.0, self.e2(h2) * 4.0


@dataclass(frozen=True)
class Tiny:
    path: Path
    model: onnx.ModelProto
    chain: Chain
    calibration: Calibration
    data: Dataset


def tiny_model(tmp: Path) -> Tiny:
    torch.manual_seed(0)
    path = tmp / "tiny_exits.onnx"
    module = TinyExits().eval()
    x = torch.randn(*SHAPE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits", "exit_1", "exit_2"],
                          dynamic_axes={n: {0: "N"} for n in ("input", "logits", "exit_1", "exit_2")},
                          opset_version=17)
    model = load_model(path)
    chain = build_chain(model)
    exits = declared_exits(model, chain)
    data = dataset(200, seed=1)
    calibration = calibrate(model, chain, exits, data, score_kind="max_softmax")
    return Tiny(path, model, chain, calibration, data)


def dataset(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(x=rng.standard_normal((n, *SHAPE[1:])).astype(np.float32),
                   y=rng.integers(0, 10, n).astype(np.int64))


def two_stage_plan(tiny: Tiny, devices: tuple[str, str] = ("host", "pi4")) -> tuple[Plan, Topology]:
    """Stage 1 on devices[0] up to the block of exit_2 with both exits; the rest on devices[1].

    Thresholds are the calibration medians, so some samples leave at each exit and some go on.
    """
    cal = tiny.calibration
    scores = cal.scores_array()
    choices = tuple(ExitChoice(name=e.name, after_block=e.after_block,
                               threshold=float(np.median(scores[:, j])), exit_rate=0.0)
                    for j, e in enumerate(cal.exits))
    last_exit = max(c.after_block for c in choices)
    n_blocks = len(tiny.chain.blocks)
    stages = (
        Stage(device=devices[0], first_block=0, last_block=last_exit, exits=choices, compute_ms=0.0,
              transfer_in_ms=0.0, memory_bytes=0, reach_rate=1.0),
        Stage(device=devices[1], first_block=last_exit + 1, last_block=n_blocks - 1, exits=(), compute_ms=0.0,
              transfer_in_ms=1.0, memory_bytes=0, reach_rate=0.3),
    )
    plan = Plan(model_sha256=tiny.chain.model_sha256, score_kind=cal.score_kind, source=devices[0], stages=stages,
                expected_latency_ms=0.0, worst_case_latency_ms=0.0, no_exit_latency_ms=0.0, accuracy=0.0,
                accuracy_lcb=0.0, full_model_accuracy=0.0, confidence=0.95, accuracy_drop=0.01, memory_bytes={},
                breakdown_ms={}, solver="hand-made (test)", status="optimal", gap=0.0, wall_s=0.0)
    topology = Topology(devices=tuple(get_device(d) for d in devices))
    return plan, topology


def served_and_stats(host, last, data: Dataset, timeout_s: float = 10.0):
    """Send ``data`` through the pipeline served at ``host`` (a ``StageProcess`` handing on to ``last``), ask its
    counters, and stop both stages: (the InferReport, the PipelineStats)."""
    from distree.runtime.client import InferenceClient, infer_dataset

    try:
        with InferenceClient(host.address, timeout_s=timeout_s) as client:
            return infer_dataset(client, data), client.stats()
    finally:
        host.stop()
        last.stop()


def ort_reference(tiny: Tiny, x: np.ndarray, thresholds: dict[str, float]) -> tuple[np.ndarray, list[str]]:
    """ONNX Runtime on the whole multi-exit model, same score function and thresholds, first exit passed."""
    session = ort.InferenceSession(tiny.model.SerializeToString(), providers=["CPUExecutionProvider"])
    preds, exits = [], []
    for i in range(len(x)):
        logits, e1, e2 = session.run(["logits", "exit_1", "exit_2"], {"input": x[i:i + 1]})
        for name, out in (("exit_1", e1), ("exit_2", e2)):
            if exit_scores(out, "max_softmax")[0] >= thresholds[name]:
                preds.append(int(out.argmax()))
                exits.append(name)
                break
        else:
            preds.append(int(logits.argmax()))
            exits.append(FINAL)
    return np.asarray(preds), exits
