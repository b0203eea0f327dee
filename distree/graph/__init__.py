"""The model as a chain of blocks between single-tensor cut points (see :mod:`distree.graph.cuts`)."""

from distree.graph.chain import Block, Chain
from distree.graph.cuts import ExitHead, build_chain, exit_attachments, exit_heads
from distree.graph.load import load_model, model_sha256
from distree.graph.segment import SegmentExtractor, coarsen, extract_segment

__all__ = [
    "Block",
    "SegmentExtractor",
    "Chain",
    "ExitHead",
    "build_chain",
    "coarsen",
    "exit_attachments",
    "exit_heads",
    "extract_segment",
    "load_model",
    "model_sha256",
]
