"""Build per-device artifacts (TVM or ONNX Runtime sub-segments), the bundle around them, and its checks."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "build_bundle": "bundle", "Manifest": "manifest", "ThresholdTable": "manifest", "read_manifest": "manifest",
    "read_thresholds": "manifest", "CompileOptions": "pipeline", "CompileResult": "pipeline",
    "compile_model": "pipeline", "VerifyReport": "verify", "verify_bundle": "verify",
    "run_bundle": "..runtime.executor", "RunReport": "..runtime.executor"})
