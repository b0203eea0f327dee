"""ONNX Runtime timings on this machine (graph optimization ALL, its default and fastest on CPU)."""

from __future__ import annotations

from distree.profiler.timing import TimingSettings, time_callable
from distree.profiler.units import Unit


def ort_session(unit: Unit, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(unit.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def time_ort(unit: Unit, settings: TimingSettings) -> tuple[float, ...]:
    sess = ort_session(unit, settings.threads)
    feed = {unit.input_name: unit.sample_input()}
    return time_callable(lambda: sess.run(None, feed), settings)
