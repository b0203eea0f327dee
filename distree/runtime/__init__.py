"""Execute a bundle: the exit policy (static thresholds + deadline override), the in-process pipeline, and
the pipeline served across devices over gRPC (``serve_stage`` on each device, ``InferenceClient`` to ask)."""

from importlib import import_module

from distree.runtime.executor import RunReport, StageExecutor, run_bundle
from distree.runtime.policy import Decision, ExitPolicy

# gRPC parts load on first use: the compiler imports this package, and the server imports the compiler
_LAZY = {"serve_stage": "server", "StageServer": "server", "InferenceClient": "client", "InferReport": "client",
         "ServeError": "client", "infer_dataset": "client"}

__all__ = ["Decision", "ExitPolicy", "RunReport", "StageExecutor", "run_bundle", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"distree.runtime.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
