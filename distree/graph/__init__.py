"""The model as a chain of blocks between single-tensor cut points (see :mod:`distree.graph.cuts`)."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "Block": "chain", "Chain": "chain", "ExitHead": "cuts", "build_chain": "cuts", "exit_attachments": "cuts",
    "exit_heads": "cuts", "load_model": "load", "model_sha256": "load", "SegmentExtractor": "segment",
    "coarsen": "segment", "extract_segment": "segment"})
