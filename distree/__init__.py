"""distree: distributed early-exit inference compiler for heterogeneous edge devices."""

__version__ = "0.1.0"
