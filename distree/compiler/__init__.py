"""Build per-device artifacts (TVM or ONNX Runtime sub-segments), the bundle around them, and its checks."""

from distree.compiler.bundle import build_bundle
from distree.compiler.manifest import Manifest, ThresholdTable, read_manifest, read_thresholds
from distree.compiler.pipeline import CompileOptions, CompileResult, compile_model
from distree.compiler.verify import VerifyReport, verify_bundle

__all__ = ["CompileOptions", "CompileResult", "Manifest", "RunReport", "ThresholdTable", "VerifyReport",
           "build_bundle", "compile_model", "read_manifest", "read_thresholds", "run_bundle", "verify_bundle"]


def __getattr__(name: str):
    """``run_bundle`` / ``RunReport`` live in distree.runtime, which imports this package: resolve lazily."""
    if name in ("run_bundle", "RunReport"):
        from distree.runtime import executor

        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
