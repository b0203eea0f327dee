"""The names of what a profile measures (its entries' ``item``), shared by the profiler, solver and compiler
without the ONNX machinery that builds the units (:mod:`distree.profiler.units`)."""

from __future__ import annotations

CALL_ITEM = "call"
RPC_ITEM = "rpc"            # a hop's gRPC round trip (timed by the profiler itself, no model)
# a stage's CPU per request it receives and answers, and per request it hands on (gRPC, framing, Python; its
# compute not included): what occupies a device beyond its compute under load, measured with the rpc entry
HANDLING_ITEMS = ("serve:receive", "serve:forward")


def block_item(index: int) -> str:
    return f"block:{index}"


def exit_item(name: str) -> str:
    return f"exit:{name}"


def entry_item(name: str) -> str:
    return f"entry:{name}"


def decide_item(score_kind: str) -> str:
    """The runtime's exit decision for one score kind (timed in Python, not a model)."""
    return f"decide:{score_kind}"
