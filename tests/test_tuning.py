"""MetaSchedule tuning: records are written, reused, applied to segments, and tuned code is correct."""

from __future__ import annotations

import json
import logging
import signal
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from ctrl_c import ctrl_c_once_listening
from distree.compiler import tuning
from distree.errors import DistreeError
from distree.targets.schedules import schedule_defaults

HOST = {"kind": "llvm", "num-cores": 1}
TRIALS_PER_ROUND = 8


def _two_conv_model() -> onnx.ModelProto:
    """input -> Conv(1->8)+Relu -> "mid" -> Conv(8->4)+Relu -> output: two distinct tuning tasks."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["mid"], name="relu1"),
        helper.make_node("Conv", ["mid", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["output"], name="relu2"),
    ]
    graph = helper.make_graph(
        nodes, "two_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 12, 12])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 12, 12])],
        initializer=[w1, b1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _second_conv_segment(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.utils.Extractor(model).extract_model(["mid"], ["output"])


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {model.graph.input[0].name: x})[0]


def _tvm(ex: tvm.runtime.Executable, x: np.ndarray) -> np.ndarray:
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return out.numpy()


def _record_lines(db_dir) -> list[dict]:
    path = tuning.records_dir(db_dir, HOST) / "database_tuning_record.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _workload_lines(db_dir) -> list[str]:
    path = tuning.records_dir(db_dir, HOST) / "database_workload.json"
    return [line for line in path.read_text().splitlines() if line.strip()]


def _scheduled_functions(mod: tvm.IRModule) -> int:
    return sum(
        1 for gv in mod.get_global_vars()
        if isinstance(mod[gv], tvm.tirx.PrimFunc) and mod[gv].attrs is not None
        and bool(mod[gv].attrs.get("tirx.is_scheduled", False))
    )


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """Two tuning runs into one database: 2 rounds (one per task), then 1 more round."""
    model = _two_conv_model()
    db_dir = tmp_path_factory.mktemp("tuning_db")
    first = tuning.tune(model, HOST, minutes=10, db_dir=db_dir, trials_per_round=TRIALS_PER_ROUND,
                        max_trials=2 * TRIALS_PER_ROUND)
    after_first = (_record_lines(db_dir), _workload_lines(db_dir))
    second = tuning.tune(model, HOST, minutes=10, db_dir=db_dir, trials_per_round=TRIALS_PER_ROUND,
                         max_trials=TRIALS_PER_ROUND)
    return model, db_dir, first, after_first, second


@pytest.mark.slow
def test_ctrl_c_ends_tuning_and_keeps_its_records(tmp_path, python_handles_sigint, caplog):
    """As a user's Ctrl-C: the round under way ends, no other starts, and what was measured is kept."""
    caplog.set_level(logging.INFO, logger=tuning._log.name)
    started = time.monotonic()
    # within the first round (it runs for seconds): setting tuning up may take longer than that on a loaded machine
    ctrl_c_once_listening(0.5, also=lambda: any("round 1:" in r.getMessage() for r in list(caplog.records)))
    result = tuning.tune(_two_conv_model(), HOST, minutes=10, db_dir=tmp_path, trials_per_round=TRIALS_PER_ROUND)
    assert result.stopped == "Ctrl-C"
    assert time.monotonic() - started < 300, "tuning went on after Ctrl-C"
    assert result.trials >= TRIALS_PER_ROUND
    assert result.trials - 2 <= len(_record_lines(tmp_path)) <= result.trials   # a candidate may fail to build
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_tune_writes_records_for_every_task(tuned):
    _, db_dir, first, (records, workloads), _ = tuned
    assert first.stopped == "max_trials"
    assert first.trials == 2 * TRIALS_PER_ROUND
    assert {t.trials for t in first.tasks if t.flops > 0} == {TRIALS_PER_ROUND}
    assert all(t.best_us is not None and t.best_us > 0 for t in first.tasks if t.flops > 0)
    assert tuning.has_records(db_dir, HOST)
    assert len(records) >= 2 * TRIALS_PER_ROUND - 2   # a candidate or two may fail to build
    assert len(workloads) == len(first.tasks)


@pytest.mark.slow
def test_second_run_extends_the_same_workloads(tuned):
    _, db_dir, _, (records, workloads), second = tuned
    assert second.trials == TRIALS_PER_ROUND
    assert _workload_lines(db_dir) == workloads          # reused, not duplicated
    assert _record_lines(db_dir)[: len(records)] == records
    assert len(_record_lines(db_dir)) > len(records)


@pytest.mark.slow
def test_tuned_model_matches_onnxruntime(tuned):
    model, db_dir, *_ = tuned
    x = np.random.default_rng(1).standard_normal((1, 1, 12, 12)).astype(np.float32)
    applied = tuning.apply_tuning(tuning.import_onnx(model), HOST, db_dir)
    assert _scheduled_functions(applied) >= 2
    _check_defaults_keep_tuned(applied)
    np.testing.assert_allclose(_tvm(tuning.build_tvm(model, HOST, db_dir), x), _ort(model, x), atol=1e-4, rtol=1e-4)


def _check_defaults_keep_tuned(applied: tvm.IRModule) -> None:
    """distree's default schedules lay out only the kernels no record covered; tuned ones stay as tuned."""
    tuned = {gv.name_hint: f for gv, f in applied.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
             and bool(f.attrs.get("tirx.is_scheduled", False))}
    kernels = sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in applied.functions_items())
    defaults = schedule_defaults(applied, tuning.as_target(HOST))
    assert defaults.kernels == kernels - len(tuned)
    for name, func in tuned.items():
        assert tvm_ffi.structural_equal(defaults.mod[name].body, func.body)       # (re-preparing adds attributes)


@pytest.mark.slow
def test_whole_model_records_apply_to_a_segment(tuned):
    model, db_dir, *_ = tuned
    segment = _second_conv_segment(model)
    applied = tuning.apply_tuning(tuning.import_onnx(segment), HOST, db_dir)
    assert _scheduled_functions(applied) >= 1
    _check_defaults_keep_tuned(applied)
    x = np.random.default_rng(2).random((1, 8, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(_tvm(tuning.build_tvm(segment, HOST, db_dir), x), _ort(segment, x), atol=1e-4, rtol=1e-4)


def test_tasks_shared_by_segments_are_merged():
    model = _two_conv_model()
    target = tuning.as_target(HOST)
    whole = tuning.extract_tasks([tuning.import_onnx(model)], target)
    both = tuning.extract_tasks([tuning.import_onnx(model), tuning.import_onnx(_second_conv_segment(model))],
                                target)
    assert len(whole) == 2
    assert len(both) == len(whole)
    assert sorted(int(t.weight) for t in both) == [1, 2]


def test_without_records_apply_returns_the_module_unchanged(tmp_path):
    mod = tuning.import_onnx(_two_conv_model())
    assert not tuning.has_records(tmp_path, HOST)
    assert tuning.apply_tuning(mod, HOST, tmp_path) is mod
    assert tuning.apply_tuning(mod, HOST, None) is mod


def test_records_are_kept_per_target(tmp_path):
    other = {"kind": "llvm", "num-cores": 2}
    assert tuning.target_key(HOST) != tuning.target_key(other)
    assert tuning.target_key(HOST) == tuning.target_key(tvm.target.Target(HOST))
    folder = tuning.records_dir(tmp_path, HOST)
    folder.mkdir(parents=True)
    (folder / "database_tuning_record.json").write_text("[0, []]\n")
    assert tuning.has_records(tmp_path, HOST)
    assert not tuning.has_records(tmp_path, other)


@pytest.mark.parametrize(
    ("target", "minutes", "message"),
    [(HOST, 0, "positive number of minutes"), ({"kind": "cuda", "arch": "sm_87"}, 1, "llvm"),
     ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}, 1, "RPC")],
)
def test_tune_rejects_bad_requests(tmp_path, target, minutes, message):
    with pytest.raises(DistreeError, match=message):
        tuning.tune(_two_conv_model(), target, minutes=minutes, db_dir=tmp_path)
