"""Exits the model already has: extra graph outputs, named explicitly or found by convention.

Convention: an extra graph output whose name starts with ``exit`` is an exit head (``exit_1``, ``exit_b3``).
Other extra outputs (e.g. distree's ``entry_b*`` heads for the stability score) are not exits. A model
written by ``distree exits`` records its exits in its metadata, which wins over the convention.
"""

from __future__ import annotations

from typing import Sequence

import onnx

from distree.errors import DistreeError
from distree.exits.heads import exit_metadata
from distree.exits.types import ExitPoint
from distree.graph import Chain, exit_heads

EXIT_PREFIX = "exit"


def declared_exits(model: onnx.ModelProto, chain: Chain, names: Sequence[str] | None = None) -> tuple[ExitPoint, ...]:
    """ExitPoints for ``names`` (default: the model's metadata, else outputs named ``exit*``), by depth."""
    recorded = {e.name: e for e in exit_metadata(model) or ()}
    if names is None:
        names = list(recorded) or [o for o in chain.exit_outputs if o.startswith(EXIT_PREFIX)]
    names = list(dict.fromkeys(names))
    if chain.output_name in names:
        raise DistreeError(f"--exit-outputs names {chain.output_name!r}, the final classifier; list only the "
                           "extra outputs that are early exits")
    unknown = [n for n in names if n not in chain.exit_outputs]
    if unknown:
        have = ", ".join(chain.exit_outputs) or "none"
        raise DistreeError(f"exit output {unknown[0]!r} is not an extra output of the model (extra outputs: "
                           f"{have}); fix --exit-outputs, or omit it to train exits with --data")
    heads = exit_heads(model, chain) if any(n not in recorded for n in names) else {}
    exits = []
    for name in names:
        if name in recorded:
            exits.append(recorded[name])
            continue
        head = heads[name]
        if not 0 <= head.after_block < len(chain.blocks) - 1:
            raise DistreeError(f"exit output {name!r} attaches after block {head.after_block}, not between two "
                               "blocks; an exit must read a tensor of block 0.."
                               f"{len(chain.blocks) - 2}; drop it from --exit-outputs")
        exits.append(ExitPoint(name=name, after_block=head.after_block, source="model", head_nodes=head.nodes,
                               flops=head.flops, param_bytes=head.param_bytes))
    return tuple(sorted(exits, key=lambda e: (e.after_block, e.name)))
