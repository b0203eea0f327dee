"""Synthetic planning inputs (chain, calibration, profile, topology) for solver tests and benchmarks.

Scores are correlated the way real early exits are: each sample has a latent difficulty, every exit sees
it through its own noise, and deeper exits are both more confident and more accurate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distree.exits.types import Calibration, ExitPoint
from distree.graph.chain import Block, Chain
from distree.profiler.dispatch import DECIDE_BACKEND, RPC_BACKEND
from distree.profiler.types import Measurement, Profile
from distree.profiler.items import CALL_ITEM, HANDLING_ITEMS, IDLE_RPC_ITEMS, RPC_ITEM, decide_item
from distree.targets.spec import DeviceSpec, LinkSpec, Topology


@dataclass(frozen=True)
class Case:
    chain: Chain
    calibration: Calibration
    profile: Profile
    topology: Topology


def synthetic_case(n_blocks: int, n_exits: int, n_levels: int, n_devices: int, n_samples: int,
                   seed: int = 0, memory_slack: float = 2.0, exit_every: bool = False,
                   num_classes: int = 10, device_names: tuple[str, ...] | None = None,
                   dispatch_ms: tuple[float, float, float] = (0.0, 0.0, 0.0),
                   handling_ms: tuple[float, float] | None = None,
                   idle_rpc_ms: tuple[float, ...] | None = None) -> Case:
    """A random but realistic instance. ``memory_slack`` < ~1 makes memory bind on small devices;
    ``dispatch_ms``: the cost of a call, of an exit decision, and of a hop's round trip (times 1 + the
    device's index: devices differ) on every device (none by default); ``handling_ms``: a stage's CPU per request
    it receives and per request it hands on (times 1 + the device's index; None: entries absent, as in profiles
    made before distree measured them); ``idle_rpc_ms``: the hop's round trip after each idle gap of
    IDLE_GAPS_MS (times 1 + the device's index; None: entries absent)."""
    rng = np.random.default_rng(seed)
    sha = f"synthetic-{seed}"
    flops = rng.uniform(1.0, 3.0, n_blocks) * 1e7
    out_bytes = (rng.uniform(0.2, 1.0, n_blocks) * 64 * 1024 / (1 + np.arange(n_blocks) / 8)).astype(int)
    out_bytes[-1] = num_classes * 4
    params = rng.uniform(0.5, 2.0, n_blocks) * 2e6 * (1 + np.arange(n_blocks) / n_blocks)
    blocks = tuple(Block(index=b, nodes=(f"n{b}",), ops=("Conv",), input=f"t{b}", output=f"t{b + 1}",
                         output_shape=(1, num_classes) if b == n_blocks - 1 else (1, int(out_bytes[b]) // 4),
                         output_dtype="float32", flops=int(flops[b]), param_bytes=int(params[b]),
                         out_bytes=int(out_bytes[b]), workspace_bytes=int(2 * out_bytes[b]))
                   for b in range(n_blocks))
    chain = Chain(model_sha256=sha, input_name="t0", input_shape=(1, 3, 32, 32), input_dtype="float32",
                  output_name=f"t{n_blocks}", exit_outputs=(), blocks=blocks)

    positions = (np.arange(n_exits) if exit_every and n_exits <= n_blocks - 1
                 else np.sort(rng.choice(n_blocks - 1, size=min(n_exits, n_blocks - 1), replace=False)))
    exits = tuple(ExitPoint(name=f"exit{k}", after_block=int(a), source="trained", head_nodes=(),
                            flops=int(2e5), param_bytes=int(rng.uniform(1e4, 2e5))) for k, a in enumerate(positions))

    difficulty = rng.normal(0.0, 1.0, n_samples)
    depth = (positions + 1) / n_blocks
    skill = -0.8 + 2.6 * depth                                    # deeper exits know more
    noise = rng.normal(0.0, 0.6, (n_samples, len(exits)))
    margin = skill[None, :] - difficulty[:, None] + noise
    scores = 1.0 / (1.0 + np.exp(-2.0 * margin))
    correct_exit = rng.random((n_samples, len(exits))) < 1.0 / (1.0 + np.exp(-(1.5 * margin + 0.5)))
    correct_final = rng.random(n_samples) < 1.0 / (1.0 + np.exp(-(2.2 - 1.2 * difficulty)))
    grid = tuple(float(t) for t in np.linspace(0.6, 0.97, n_levels))
    calibration = Calibration(
        model_sha256=sha, score_kind="max_softmax", exits=exits,
        scores=tuple(tuple(float(s) for s in row) for row in np.round(scores, 6)),
        correct=tuple(tuple(bool(c) for c in row) + (bool(f),) for row, f in zip(correct_exit, correct_final)),
        thresholds=tuple(grid for _ in exits), split_sizes={"threshold": n_samples})

    speed = np.sort(rng.uniform(2.0, 40.0, n_devices))             # GFLOP/s, slow first
    total_params = params.sum()
    devices = tuple(DeviceSpec(
        name=device_names[d] if device_names else f"dev{d}", target={"kind": "llvm"}, host=None,
        memory_bytes=int(64 * 2 ** 20 + total_params * memory_slack * rng.uniform(0.3, 1.0)),
        cores=4, peak_gflops=float(speed[d]), mem_gbps=10.0) for d in range(n_devices))
    entries = []
    for d, dev in enumerate(devices):
        for b in range(n_blocks):
            ms = float(flops[b] / (speed[d] * 1e6) * rng.uniform(0.8, 1.2))
            entries.append(Measurement(device=dev.name, item=f"block:{b}", backend="tvm", provenance="estimate",
                                       samples_ms=(), median_ms=ms, p90_ms=ms, param_bytes=int(params[b]),
                                       activation_bytes=int(2 * out_bytes[b])))
        for ex in exits:
            ms = float(rng.uniform(0.02, 0.15) * flops.mean() / (speed[d] * 1e6))
            entries.append(Measurement(device=dev.name, item=f"exit:{ex.name}", backend="tvm",
                                       provenance="estimate", samples_ms=(), median_ms=ms, p90_ms=ms,
                                       param_bytes=ex.param_bytes, activation_bytes=4096))
        entries += [Measurement(device=dev.name, item=item, backend=backend, provenance="estimate", samples_ms=(),
                                median_ms=ms, p90_ms=ms, param_bytes=0, activation_bytes=0)
                    for item, backend, ms in ((CALL_ITEM, "tvm", dispatch_ms[0]),
                                              (decide_item("max_softmax"), DECIDE_BACKEND, dispatch_ms[1]),
                                              (RPC_ITEM, RPC_BACKEND, dispatch_ms[2] * (1 + d)))]
        entries += [Measurement(device=dev.name, item=item, backend=RPC_BACKEND, provenance="estimate", samples_ms=(),
                                median_ms=ms * (1 + d), p90_ms=ms * (1 + d), param_bytes=0, activation_bytes=0)
                    for item, ms in [*zip(HANDLING_ITEMS, handling_ms or ()),
                                     *zip(IDLE_RPC_ITEMS, idle_rpc_ms or ())]]
    profile = Profile(model_sha256=sha, entries=tuple(entries), versions={"synthetic": str(seed)})
    links = tuple(LinkSpec(src=a.name, dst=b.name, bandwidth_mbps=float(rng.uniform(20, 500)),
                           latency_ms=float(rng.uniform(0.2, 3.0)))
                  for i, a in enumerate(devices) for b in devices[i + 1:])
    return Case(chain, calibration, profile, Topology(devices=devices, links=links))
