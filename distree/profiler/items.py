"""The names of what a profile measures (its entries' ``item``), shared by the profiler, solver and compiler
without the ONNX machinery that builds the units (:mod:`distree.profiler.units`)."""

from __future__ import annotations

CALL_ITEM = "call"
RPC_ITEM = "rpc"            # a hop's gRPC round trip (timed by the profiler itself, no model)
# a stage's CPU per request it receives and answers, and per request it hands on (gRPC, framing, Python; its
# compute not included): what occupies a device beyond its compute under load, measured with the rpc entry
HANDLING_ITEMS = ("serve:receive", "serve:forward")
# the rpc round trip again for a request that comes after the hop sat idle this long: gRPC's threads on both ends
# have gone to sleep and each hand-off pays for waking one (on this machine's loopback ~0.5 ms back to back,
# ~1.5 ms after 8 ms or more); the longest gap is what a lone request pays
IDLE_GAPS_MS = (1, 2, 4, 8, 32)
IDLE_RPC_ITEMS = tuple(f"rpc:idle:{gap}ms" for gap in IDLE_GAPS_MS)
HOP_ITEMS = (RPC_ITEM, *HANDLING_ITEMS, *IDLE_RPC_ITEMS)   # timed together, on one gRPC peer


def block_item(index: int) -> str:
    return f"block:{index}"


def exit_item(name: str) -> str:
    return f"exit:{name}"


def entry_item(name: str) -> str:
    return f"entry:{name}"


def decide_item(score_kind: str) -> str:
    """The runtime's exit decision for one score kind (timed in Python, not a model)."""
    return f"decide:{score_kind}"
