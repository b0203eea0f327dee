"""An independent evaluator of a Plan, straight from calibration data, profile, chain and topology.

Shares no code with distree.solver: it replays every calibration sample through the plan's stages, one
block and one head at a time, the way the runtime would, and checks every constraint from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

from distree.exits.types import Calibration
from distree.graph.chain import Chain
from distree.profiler.types import Profile
from distree.solver.plan import Plan
from distree.targets.spec import Topology


@dataclass
class Replay:
    expected_ms: float
    worst_ms: float
    accuracy: float
    correct: int
    exit_rates: dict[str, float]
    memory: dict[str, int]
    busy_ms: dict[str, float]
    contiguous_ordered: bool


def _dispatch(profile: Profile, device: str, n_blocks: int, score_kind: str):
    """(item -> time inside a segment, call cost of a sub-segment, decision cost, gRPC round trip, the stage's CPU
    per request received and handed on) on ``device``, as distree.solver.problem.build_problem states them."""
    per_backend = {m.backend for m in profile.entries if m.device == device and m.item == "block:0"}
    totals = {b: sum(profile.get(device, f"block:{k}", b).median_ms for k in range(n_blocks)) for b in per_backend}
    favourite = min(sorted(totals), key=lambda b: totals[b])      # the backend with the least time over all blocks
    call = profile.get(device, "call", favourite).median_ms
    decide = profile.get(device, f"decide:{score_kind}").median_ms
    rpc = profile.get(device, "rpc").median_ms
    handled = {m.item: m.median_ms for m in profile.entries if m.device == device and m.item.startswith("serve:")}

    def inside(item: str) -> float:
        m = profile.get(device, item)
        return max(0.0, m.median_ms - profile.get(device, "call", m.backend).median_ms)
    return inside, call, decide, rpc, (handled.get("serve:receive", 0.0), handled.get("serve:forward", 0.0))


def replay(plan: Plan, chain: Chain, cal: Calibration, profile: Profile, topo: Topology) -> Replay:
    column = {ex.name: k for k, ex in enumerate(cal.exits)}
    source = topo.source_device
    classes_bytes = chain.blocks[-1].output_shape[-1] * 4
    last = len(chain.blocks) - 1
    devices = {source, *(s.device for s in plan.stages)}
    cost = {d: _dispatch(profile, d, len(chain.blocks), cal.score_kind) for d in devices}

    def hop(a: str, b: str) -> float:
        """Into another device: its first call, and the gRPC round trip shared by both ends."""
        return 0.0 if a == b else cost[b][1] + (cost[a][3] + cost[b][3]) / 2
    n = len(cal.scores)
    total = 0.0
    correct = 0
    rates = {e.name: 0 for s in plan.stages for e in s.exits}
    busy = {s.device: 0.0 for s in plan.stages}
    if source not in busy:          # it runs no stage: it relays every request (receives it, hands it on)
        busy[source] = sum(cost[source][4])
    for i in range(n):
        t = 0.0
        here = source
        answer = None
        for k, stage in enumerate(plan.stages):
            inside, call, decide, _, (received, handed_on) = cost[stage.device]
            busy[stage.device] += received / n
            t += topo.link(here, stage.device).transfer_ms(
                chain.input_bytes if stage.first_block == 0 else chain.blocks[stage.first_block - 1].out_bytes)
            t += hop(here, stage.device)
            here = stage.device
            for b in range(stage.first_block, stage.last_block + 1):
                ms = inside(f"block:{b}") + (call if b == last else 0.0)
                t += ms
                busy[here] += ms / n
                here_exits = sorted((e for e in stage.exits if e.after_block == b), key=lambda e: column[e.name])
                for e in here_exits:
                    head = inside(f"exit:{e.name}") + decide + call
                    t += head
                    busy[here] += head / n
                    if cal.scores[i][column[e.name]] >= e.threshold:
                        answer = cal.correct[i][column[e.name]]
                        rates[e.name] += 1
                        break
                if answer is not None:
                    break
            if answer is not None:
                break
            if k + 1 < len(plan.stages):
                busy[here] += handed_on / n
        if answer is None:
            answer = cal.correct[i][-1]
        t += topo.link(here, source).transfer_ms(classes_bytes)
        total += t
        correct += bool(answer)
    worst = 0.0
    here = source
    memory = {}
    for stage in plan.stages:
        inside, call, decide, _, _ = cost[stage.device]
        worst += topo.link(here, stage.device).transfer_ms(
            chain.input_bytes if stage.first_block == 0 else chain.blocks[stage.first_block - 1].out_bytes)
        worst += hop(here, stage.device)
        here = stage.device
        names = [f"block:{b}" for b in range(stage.first_block, stage.last_block + 1)]
        names += [f"exit:{e.name}" for e in stage.exits]
        items = [profile.get(here, name) for name in names]
        worst += sum(inside(name) for name in names) + len(stage.exits) * (decide + call)
        worst += call if stage.last_block == last else 0.0
        memory[here] = sum(m.param_bytes for m in items) + max(m.activation_bytes for m in items)
    worst += topo.link(here, source).transfer_ms(classes_bytes)
    blocks = [b for s in plan.stages for b in range(s.first_block, s.last_block + 1)]
    devices = [s.device for s in plan.stages]
    order = [d.name for d in topo.devices]
    ordered = blocks == list(range(len(chain.blocks))) and len(set(devices)) == len(devices)
    return Replay(expected_ms=total / n, worst_ms=worst, accuracy=correct / n, correct=correct,
                  exit_rates={k: v / n for k, v in rates.items()}, memory=memory, busy_ms=busy,
                  contiguous_ordered=ordered and devices == sorted(devices, key=order.index))
