"""Execute a bundle: the exit policy (static thresholds + deadline override) and the in-process pipeline."""

from distree.runtime.executor import RunReport, run_bundle
from distree.runtime.policy import Decision, ExitPolicy

__all__ = ["Decision", "ExitPolicy", "RunReport", "run_bundle"]
