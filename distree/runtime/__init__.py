"""Execute a bundle: the exit policy (static thresholds + deadline override), the in-process pipeline, and
the pipeline served across devices over gRPC (``serve_stage`` on each device, ``InferenceClient`` to ask)."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "RunReport": "executor", "StageExecutor": "executor", "run_bundle": "executor", "Decision": "policy",
    "ExitPolicy": "policy", "serve_stage": "server", "StageServer": "server", "InferenceClient": "client",
    "InferReport": "client", "ServeError": "client", "infer_dataset": "client"})
