"""`distree serve` / `distree infer`: the tiny multi-exit CNN's bundle served as one process per device on
loopback (host stage = TVM, pi4 stage = its ONNX under ONNX Runtime), against `run_bundle` in process."""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

import compiler_fixtures as cf
from distree.cli import cli
from distree.compiler.bundle import build_bundle
from distree.compiler.manifest import read_manifest, read_thresholds
from distree.errors import DistreeError
from distree.graph.chain import Chain
from distree.runtime.client import InferenceClient, ServeError, infer_dataset
from distree.runtime.executor import FINAL, StageExecutor, run_bundle
from distree.runtime.link import NO_FREE_STREAM
from distree.runtime.local import StageProcess
from distree.runtime.policy import ExitPolicy
from distree.runtime.server import INFER_STREAM, UNARY_RESERVE, serve_stage
from distree.solver.plan import Stage
from distree.workload import Load, arrival_times_ms
from distree.runtime.wire import Hop, Reply, Request, WireError, decode_reply, decode_request, encode_reply, \
    encode_request

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle


def _served(bundle: Path, device: str, next_address: str | None = None) -> StageProcess:
    """`python -m distree serve` in its own process, with a short forward timeout for the failure tests."""
    return StageProcess(bundle, device, next_address=next_address, extra_args=("--forward-timeout-s", "5"),
                        start_timeout_s=START_TIMEOUT_S, cwd=REPO)


def _pipeline(bundle: Path) -> tuple[StageProcess, StageProcess]:
    pi4 = _served(bundle, "pi4")
    return _served(bundle, "host", pi4.address), pi4


def _stop_every_thread(proc: subprocess.Popen) -> None:
    """SIGSTOP, and wait until the kernel has stopped every thread: it is delivered to one thread, which stops
    the rest when next scheduled, so on a loaded machine the others may serve one more request before that."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not all(state in "tT" for state in _thread_states(proc.pid)):
        assert time.monotonic() < deadline, f"pid {proc.pid} did not stop within 10 s of SIGSTOP"
        time.sleep(0.001)


def _thread_states(pid: int) -> list[str]:
    """Each live thread's state letter from /proc (a thread may end while we read)."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rpartition(")")[2].split()[0])
        except FileNotFoundError:
            continue
    return states


@pytest.fixture(scope="module")
def served(bundle):
    host, pi4 = _pipeline(bundle)
    yield host
    host.stop()
    pi4.stop()


def test_served_pipeline_answers_like_run_bundle(served, bundle):
    data = cf.dataset(200, seed=5)
    want = run_bundle(bundle, data)
    with InferenceClient(served.address) as client:
        got = infer_dataset(client, data)
    assert got.predictions == want.predictions
    assert got.exits == want.exits
    assert set(got.exits) == {"exit_1", "exit_2", FINAL}      # answers at both exits and at the end
    assert got.reasons == tuple("final" if e == FINAL else "threshold" for e in got.exits)
    assert got.accuracy == pytest.approx(want.accuracy)
    assert got.exit_rates == pytest.approx(want.exit_rates)
    assert got.deadline_exits == got.deadline_missed == 0
    by_device = {h.device: h for h in got.hops}
    assert by_device["host"].reached == 200 and by_device["pi4"].reached == got.exits.count(FINAL)
    assert by_device["host"].link["count"] == got.exits.count(FINAL)   # only those went on to pi4
    assert got.stages == ("host", "pi4") and got.end_to_end["count"] == 200


def test_infer_command_reports_on_the_served_pipeline(served, tmp_path):
    data = cf.dataset(20, seed=6)
    np.savez(tmp_path / "data.npz", x=data.x, y=data.y)
    result = CliRunner().invoke(cli, ["infer", served.address, "--input", str(tmp_path / "data.npz")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("20 samples via host -> pi4, accuracy ")


@pytest.mark.parametrize("load", [Load(clients=4), Load(clients=UNARY_RESERVE + 12), Load(rate=400.0)],
                         ids=["4 clients", "more clients than stream slots", "Poisson 400 req/s"])
def test_under_a_load_every_request_is_answered_as_when_sent_one_at_a_time(served, bundle, load):
    """Closed loop (several requesters: past a stage's 12 stream slots some are answered unary) and open loop
    (Poisson arrivals, answered or not): the same answers, in sample order, as `run_bundle`."""
    data = cf.dataset(120, seed=9)
    want = run_bundle(bundle, data)
    with InferenceClient(served.address) as client:
        got = infer_dataset(client, data, load=load, seed=3)
    assert got.predictions == want.predictions and got.exits == want.exits
    assert got.workload == load.label and (got.rate_rps, got.clients) == (load.rate, load.clients)
    assert got.end_to_end["count"] == got.client_wait_ms["count"] == 120
    if load.rate is not None:       # requests were sent at their arrivals, not as fast as answers came back
        last_arrival_s = arrival_times_ms(load.rate, 120, np.random.default_rng(3))[-1] / 1e3
        assert got.throughput_rps <= 120 / last_arrival_s
        assert got.client_wait_ms["mean_ms"] >= 0.0 and min(got.latency_ms) > 0.0
    else:
        assert got.client_wait_ms["p99_ms"] == 0.0


def test_infer_under_a_load_reports_it_and_refuses_two_loads(served, tmp_path):
    data = cf.dataset(40, seed=6)
    np.savez(tmp_path / "data.npz", x=data.x, y=data.y)
    base = ["infer", served.address, "--input", str(tmp_path / "data.npz")]
    result = CliRunner().invoke(cli, [*base, "--rate", "300", "--seed", "2", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "load 300 req/s (seed 2): answered " in result.output and "arrival to send" in result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["workload"] == "300 req/s" and doc["rate_rps"] == 300.0 and len(doc["latency_ms"]) == 40
    result = CliRunner().invoke(cli, [*base, "--clients", "3"])
    assert result.exit_code == 0 and "load 3 client(s): answered " in result.output, result.output
    for extra, message in ((["--rate", "300", "--clients", "3"], "give --rate (open loop) or --clients"),
                           (["--rate", "0"], "'--rate'"), (["--clients", "65"], "'--clients'")):
        result = CliRunner().invoke(cli, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("flags", [[], ["--clients", "3"], ["--rate", "5"]], ids=["one at a time", "clients", "rate"])
def test_ctrl_c_ends_infer_at_once_saying_how_far_it_got(served, tmp_path, flags):
    data = cf.dataset(20, seed=6)
    np.savez(tmp_path / "data.npz", x=np.repeat(data.x, 2000 if flags[:1] != ["--rate"] else 10, axis=0))
    proc = subprocess.Popen([sys.executable, "-m", "distree", "infer", served.address, "--input",
                             str(tmp_path / "data.npz"), "--json", str(tmp_path / "r.json"), *flags],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5 and proc.returncode == 130, (out, err)
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert re.fullmatch(r"stopped: Ctrl-C: \d+ of \d+ requests answered, no report written; --limit sends fewer",
                        line), line
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("load", [Load(clients=4), Load(rate=200.0)], ids=["4 clients", "Poisson"])
def test_a_stage_lost_under_load_is_one_error_and_the_other_requesters_stop(bundle, tmp_path, load):
    """The first failed request ends the run with its stage's error; the requests not yet sent are not sent
    (each would wait for its own failure)."""
    data = cf.dataset(400, seed=5)
    np.savez(tmp_path / "data.npz", x=data.x)
    host, pi4 = _pipeline(bundle)
    try:
        pi4.stop()
        flag = ["--rate", str(load.rate)] if load.rate else ["--clients", str(load.clients)]
        t0 = time.monotonic()
        result = CliRunner().invoke(cli, ["infer", host.address, "--input", str(tmp_path / "data.npz"),
                                          "--timeout-s", "3", *flag])
        elapsed = time.monotonic() - t0
    finally:
        host.stop()
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error: ") and f"next stage pi4 at {pi4.address} is unreachable" in line, line
    assert elapsed < 400 / 200.0, elapsed     # stopped at the first failure, not after every arrival


def test_data_of_the_wrong_layout_or_size_is_refused_with_the_fix(served, bundle, tmp_path):
    """The same check for `run` (the bundle) and `infer` (the served bundle): channels last vs first gets the
    exact transpose, another size a resize."""
    nchw = cf.dataset(4, seed=7).x                                          # (4, 1, 16, 16) float32
    cases = {"nhwc": (nchw.transpose(0, 2, 3, 1), "channels first (NCHW): save x.transpose(0, 3, 1, 2)"),
             "big": (np.zeros((4, 1, 20, 20), np.float32), "resize the images")}
    for name, (x, fix) in cases.items():
        np.savez(tmp_path / f"{name}.npz", x=x)
        for command in (["run", str(bundle)], ["infer", served.address]):
            result = CliRunner().invoke(cli, [*command, "--input", str(tmp_path / f"{name}.npz")])
            assert result.exit_code == 2, result.output
            (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
            assert fix in line and "expects (1, 16, 16) float32" in line, line



def test_labels_outside_the_models_classes_are_refused_by_run(bundle, tmp_path):
    """1-based labels (or another dataset's) once ran to an accuracy that counted right answers wrong."""
    data = cf.dataset(4, seed=7)
    classes = Chain.load(bundle / "planning" / "chain.json").blocks[-1].output_shape[-1]
    np.savez(tmp_path / "shifted.npz", x=data.x, y=np.arange(4) + classes - 3)
    result = CliRunner().invoke(cli, ["run", str(bundle), "--input", str(tmp_path / "shifted.npz")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: --input: labels span {classes - 3}..{classes}, the model has {classes} "
                                     f"classes; labels must be class indices in 0..{classes - 1}")

def test_reply_carries_the_answering_logits_and_hops(served, bundle):
    data = cf.dataset(20, seed=5)
    want = run_bundle(bundle, data)
    index = want.exits.index(FINAL)
    with InferenceClient(served.address) as client:
        reply = client.infer(data.x[index], request_id="r-1")
    assert reply.id == "r-1" and reply.exit == FINAL and reply.reason == "final"
    assert [h.device for h in reply.hops] == ["host", "pi4"]
    assert reply.hops[0].forward_ms >= reply.hops[1].total_ms > 0
    assert reply.logits.shape == (1, 10) and reply.prediction == int(reply.logits.argmax())


def test_tight_deadline_answers_from_the_source_exit(served, bundle):
    data = cf.dataset(40, seed=6)
    free = run_bundle(bundle, data)
    with InferenceClient(served.address) as client:
        rushed = infer_dataset(client, data, deadline_ms=0.001)     # nothing can finish in time
        roomy = infer_dataset(client, data, deadline_ms=60_000.0)
    assert set(rushed.exits) == {"exit_1"}
    assert rushed.reasons == tuple("threshold" if e == "exit_1" else "deadline" for e in free.exits)
    assert rushed.deadline_exits == sum(e != "exit_1" for e in free.exits) > 0
    assert rushed.deadline_missed == 40            # early answers still arrive after 1 microsecond
    assert [h.device for h in rushed.hops] == ["host"]
    assert roomy.exits == free.exits and roomy.deadline_exits == roomy.deadline_missed == 0


def test_stage_without_an_exit_head_continues_and_flags_the_miss(bundle):
    """pi4's stage has no exit: a lost deadline cannot be saved there, so it runs on and says so."""
    manifest = read_manifest(bundle)
    pi4 = StageExecutor(bundle, manifest, 1, ExitPolicy(read_thresholds(bundle)))
    x = np.zeros(pi4.input.shape, dtype=pi4.input.dtype)
    late = pi4.run(x, elapsed_ms=5.0, deadline_ms=1.0)
    assert late.late and late.answer.reason == "final"
    assert not pi4.run(x, elapsed_ms=0.0, deadline_ms=60_000.0).late


def test_requests_to_a_later_stage_are_refused(served, bundle):
    with InferenceClient(served.address) as source:
        pi4 = source.info()["next"]
    with InferenceClient(pi4) as client, pytest.raises(ServeError, match="source device host"):
        client.infer(cf.dataset(1, seed=0).x[0])


@pytest.mark.slow
def test_dead_or_stuck_next_stage_is_a_clear_error_not_a_hang(bundle):
    data = cf.dataset(20, seed=5)
    index = run_bundle(bundle, data).exits.index(FINAL)     # a sample that needs pi4
    host, pi4 = _pipeline(bundle)
    try:
        with InferenceClient(host.address, timeout_s=3.0) as client:
            assert client.infer(data.x[index]).exit == FINAL
            _stop_every_thread(pi4.proc)                    # alive but not answering
            t0 = time.monotonic()
            with pytest.raises(ServeError, match=f"next stage pi4 at {pi4.address} did not answer within"):
                client.infer(data.x[index])
            assert time.monotonic() - t0 < 3.0
            pi4.stop()                                      # gone
            t0 = time.monotonic()
            with pytest.raises(ServeError, match=f"next stage pi4 at {pi4.address} is unreachable"):
                client.infer(data.x[index])
            assert time.monotonic() - t0 < 3.0
            early = run_bundle(bundle, data).exits.index("exit_1")
            assert client.infer(data.x[early]).exit == "exit_1"     # the source still answers what it can
    finally:
        host.stop()
        pi4.stop()


def test_source_without_a_stage_relays_to_the_first_stage(tiny, tmp_path):
    """The solver may leave the source idle (the example's plan does): it still takes requests and answers."""
    plan, topology = cf.two_stage_plan(tiny)
    (first, second) = plan.stages
    whole = Stage(device="pi4", first_block=0, last_block=second.last_block, exits=first.exits, compute_ms=0.0,
                  transfer_in_ms=1.0, memory_bytes=0, reach_rate=1.0)
    plan = type(plan).from_dict({**plan.to_dict(), "stages": [whole.to_dict()]})
    bundle = build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, tmp_path / "b", backend="ort")
    data = cf.dataset(30, seed=8)
    pi4 = serve_stage(bundle, "pi4", "127.0.0.1:0")
    host = serve_stage(bundle, "host", "127.0.0.1:0", pi4.address)
    try:
        with InferenceClient(host.address) as client:
            got = infer_dataset(client, data)
    finally:
        host.stop(0)
        pi4.stop(0)
    want = run_bundle(bundle, data)
    assert host.description.startswith("host (source, no stage of its own")
    assert got.predictions == want.predictions and got.exits == want.exits
    assert [h.device for h in got.hops] == ["host", "pi4"] and got.hops[0].compute["median_ms"] == 0.0


def test_a_stage_with_no_stream_slot_left_still_answers_unary(bundle):
    """Each open request stream holds one of a server's worker threads: past its slots a caller is refused a
    stream (by name) and answered by a unary call, never left waiting for a thread."""
    data = cf.dataset(20, seed=5)
    want = run_bundle(bundle, data)
    pi4 = serve_stage(bundle, "pi4", "127.0.0.1:0", workers=UNARY_RESERVE + 1)     # one stream slot
    host = serve_stage(bundle, "host", "127.0.0.1:0", pi4.address)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    try:
        with InferenceClient(pi4.address) as probe:
            info = probe.info()
        x = np.zeros(info["accepts"]["shape"], dtype=info["accepts"]["dtype"])
        frame = encode_request(Request(id="holder", bundle=info["bundle"], tensor=info["accepts"]["name"],
                                       deadline_ms=None, elapsed_ms=0.0, x=x))
        with grpc.insecure_channel(pi4.address) as channel:
            holder = channel.stream_stream(INFER_STREAM)(iter(outbox.get, None), timeout=30)
            outbox.put(frame)
            assert decode_reply(next(holder)).id == "holder"                     # the slot is taken
            with pytest.raises(grpc.RpcError) as refused:
                next(channel.stream_stream(INFER_STREAM)(iter([frame]), timeout=10))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == f"pi4: {NO_FREE_STREAM}"
            with InferenceClient(host.address) as client:
                got = infer_dataset(client, data)
            outbox.put(None)
    finally:
        host.stop(0)
        pi4.stop(0)
    assert got.predictions == want.predictions and FINAL in got.exits     # pi4 answered, unary


def test_tampered_bundle_refuses_to_start_naming_the_file(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    victim = copy / "host" / "s0_seg1_b4-5.onnx"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "distree", "serve", str(copy), "--device", "host",
                           "--listen", "127.0.0.1:0", "--next", "127.0.0.1:1"], cwd=REPO, capture_output=True,
                          text=True, timeout=START_TIMEOUT_S)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "s0_seg1_b4-5.onnx: SHA-256 does not match" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_device_needs_only_its_own_folder(bundle, tmp_path):
    """As deployed (`scp -r bundle/pi4 ...`): pi4's folder and the shared files; host's folder is absent."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    shutil.rmtree(copy / "host")
    server = serve_stage(copy, "pi4", "127.0.0.1:0")
    server.stop(0)
    (copy / "thresholds.json").write_text((copy / "thresholds.json").read_text().replace("0.", "0.0", 1))
    with pytest.raises(DistreeError, match="thresholds.json: SHA-256 does not match"):
        serve_stage(copy, "pi4", "127.0.0.1:0")
    with pytest.raises(DistreeError, match=r"host/s0_seg0_b0-3.onnx: listed in the manifest but missing"):
        serve_stage(copy, "host", "127.0.0.1:0", "127.0.0.1:1")


def test_stages_of_two_bundles_refuse_to_answer_together(bundle, tmp_path):
    """One device updated and not the other (here: the same model re-bundled, so every tensor still fits):
    a request that needs both stages is refused by name, never answered by a mix of two plans."""
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    manifest = other / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"created_utc": "', '"created_utc": "1', 1))
    data = cf.dataset(20, seed=5)
    want = run_bundle(bundle, data)
    final, early = want.exits.index(FINAL), want.exits.index("exit_1")
    pi4 = serve_stage(other, "pi4", "127.0.0.1:0")
    host = serve_stage(bundle, "host", "127.0.0.1:0", pi4.address)
    try:
        with InferenceClient(host.address) as client:
            assert client.infer(data.x[early]).exit == "exit_1"        # answered by the host alone: fine
            with pytest.raises(ServeError, match=r"pi4: the request comes from bundle [0-9a-f]{12}, this device "
                                                 r"serves bundle [0-9a-f]{12} .*every device must serve the same"):
                client.infer(data.x[final])
    finally:
        host.stop(0)
        pi4.stop(0)


@pytest.mark.parametrize("args, message", [
    (["--device", "pi9"], "device 'pi9' is not in the bundle"),
    (["--device", "host"], "host hands requests on to pi4"),
    (["--device", "pi4", "--next", "127.0.0.1:1"], "runs the last stage"),
    (["--device", "pi4", "--listen", "nowhere"], "--listen 'nowhere' is not HOST:PORT"),
])
def test_bad_serve_arguments_are_one_line_errors(bundle, args, message):
    argv = ["serve", str(bundle), *args]
    if "--listen" not in args:
        argv += ["--listen", "127.0.0.1:0"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_address_that_cannot_be_listened_on_is_one_line_before_the_stage_loads(tmp_path, capfd):
    """A port in use was refused only after the bundle was verified and loaded, and gRPC logged its own
    "Failed to add port" line in C before distree's."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        for address, why in ((listen, "Address already in use"), ("192.0.2.1:50051", "Cannot assign requested")):
            with pytest.raises(DistreeError, match=f"cannot listen on {address}: {why}.*; pick another --listen"):
                serve_stage(tmp_path / "no-bundle-needed", "pi4", address)
    assert "Failed to add port" not in capfd.readouterr().err


@pytest.mark.parametrize("command", ["run", "infer"])
@pytest.mark.parametrize("flag, value, allowed", [("--limit", "0", "x>=1"), ("--limit", "-3", "x>=1"),
                                                  ("--deadline-ms", "-1", "x>0")])
def test_out_of_range_numbers_are_refused(bundle, tmp_path, command, flag, value, allowed):
    """--limit -3 once ran all but the last 3 samples (a Python slice), --limit 0 reported on none and a
    negative deadline answered everything from the first exit."""
    target = str(bundle) if command == "run" else "127.0.0.1:1"
    result = CliRunner().invoke(cli, [command, target, "--input", str(tmp_path / "x.npz"), flag, value])
    assert result.exit_code == 2 and f"'{flag}'" in result.output and allowed in result.output


def test_unreachable_source_is_a_clear_error():
    with InferenceClient("127.0.0.1:1", timeout_s=2.0) as client, \
            pytest.raises(ServeError, match="cannot reach 127.0.0.1:1"):
        client.info()


def test_frames_round_trip_and_bad_fields_are_named():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    req = decode_request(encode_request(Request("a", "b" * 64, "input", 5.0, 1.5, x, timeout_s=2.5)))
    assert (req.id, req.bundle, req.tensor, req.deadline_ms, req.elapsed_ms, req.timeout_s) == \
        ("a", "b" * 64, "input", 5.0, 1.5, 2.5)
    assert np.array_equal(req.x, x) and req.x.dtype == np.float32
    hop = Hop("host", 0.0, 1.0, 0.0, 1.5)
    reply = Reply("a", 2, "exit_1", "deadline", True, None, (hop,), "exit_1", np.eye(1, 4, 2, dtype=np.float32))
    assert decode_reply(encode_reply(reply)).hops == (hop,)
    frame = encode_request(Request("a", "b" * 64, "input", None, 0.0, x))
    with pytest.raises(WireError, match="bad magic"):
        decode_request(b"XXXX" + frame[4:])
    with pytest.raises(WireError, match="tensor has 44 bytes"):
        decode_request(frame[:-4])
    with pytest.raises(WireError, match="expected a reply header"):
        decode_reply(frame)
    for field, value, message in [("elapsed_ms", -1.0, "elapsed_ms is -1.0"), ("id", "", "field id"),
                                  ("bundle", None, "field bundle"),
                                  ("deadline_ms", "soon", "deadline_ms is 'soon'"),
                                  ("timeout_s", -2, "timeout_s is -2")]:
        with pytest.raises(WireError, match=message):
            decode_request(_with(frame, field, value))
    with pytest.raises(WireError, match="dtype is 'object'"):
        decode_request(_with(frame, "dtype", "object"))
    with pytest.raises(WireError, match=r"shape is \[True, 3, 2, 2\]"):
        decode_request(_with(frame, "shape", [True, 3, 2, 2]))
    # every wire dtype, whatever the sender's byte order or memory layout, arrives equal and native
    for array in (np.arange(6, dtype=np.int64).reshape(2, 3), np.arange(6, dtype=">f4").reshape(2, 3),
                  np.arange(12, dtype=np.float16).reshape(3, 4).T, np.array([[255, 0]], dtype=np.uint8)):
        got = decode_request(encode_request(Request("a", "b" * 64, "input", None, 0.0, array))).x
        assert np.array_equal(got, array) and got.dtype == array.dtype.newbyteorder("=") and got.dtype.isnative
    with pytest.raises(WireError, match="cannot send a complex64 tensor"):
        encode_request(Request("a", "b" * 64, "input", None, 0.0, np.zeros(2, dtype=np.complex64)))


def _with(frame: bytes, field: str, value) -> bytes:
    """The frame with one header field replaced (tensor bytes kept)."""
    import json
    import struct

    (size,) = struct.unpack("<I", frame[4:8])
    head = json.loads(frame[8:8 + size])
    head[field] = value
    raw = json.dumps(head).encode()
    return frame[:4] + struct.pack("<I", len(raw)) + raw + frame[8 + size:]
