"""`distree bench` on a real bundle (host stage: TVM libraries; pi4 stage: an aarch64 library, not measurable
here): measurement, regression against a baseline (exit 1), user errors (exit 2), the noise rule."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from distree.bench.compare import compare
from distree.bench.measure import END_TO_END, BenchResult
from distree.cli import cli


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle


@pytest.fixture(scope="module")
def measured(bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("m") / "now.json"
    r = _bench(bundle, "--out", str(out))
    assert r.exit_code == 0, r.output
    return out


def _bench(bundle: Path, *args: str):
    return CliRunner().invoke(cli, ["bench", str(bundle), "--repeats", "10", "--warmup", "2", *args])


def _edited(path: Path, tmp: Path, edit) -> Path:
    doc = json.loads(path.read_text())
    edit(doc)
    out = tmp / "baseline.json"
    out.write_text(json.dumps(doc))
    return out


def test_measures_host_segments_and_names_the_ones_it_cannot(measured, bundle):
    r = BenchResult.load(measured)
    assert [s.key for s in r.segments] == ["host:b0-3", "host:b4-5", "pi4:b6-10"]
    host = [s for s in r.segments if s.device == "host"]
    assert all(s.measurable and s.backend == "tvm" and 0 < s.median_ms <= s.p90_ms and len(s.samples_ms) == 10
               for s in host)
    (pi4,) = [s for s in r.segments if s.device == "pi4"]
    assert not pi4.measurable and pi4.median_ms is None and "aarch64" in pi4.reason
    assert r.end_to_end.measurable and r.end_to_end.median_ms >= max(s.median_ms for s in host) * 0.5
    assert len(r.manifest_sha256) == 64 and len(r.load_average) == 3 and r.threads == 1 and r.tvm_version
    again = _bench(bundle)
    assert "NOT MEASURABLE HERE" in again.stderr and "pi4/s1_seg0_b6-10.so" in again.stderr


def test_faster_baseline_fails_with_exit_1_naming_the_segment(measured, bundle, tmp_path):
    def faster(doc):
        for s in doc["segments"]:
            if s["key"] == "host:b0-3":
                s["median_ms"] /= 50
    # tolerance 300%: the other segments are unchanged, and on a loaded machine one re-measured +35% (flagged at
    # the default 15%), and +103% once their TVM code took ~0.01 ms (a neighbour's burst on a 2-vCPU VM); the
    # edited one is 50x off
    r = _bench(bundle, "--baseline", str(_edited(measured, tmp_path, faster)), "--tolerance", "3.0")
    assert r.exit_code == 1, r.output + r.stderr
    assert "regression: host:b0-3" in r.stderr and "host:b4-5" not in r.stderr.split("regression:")[1]


def test_matching_baseline_passes(measured, bundle):
    # a generous tolerance: this is a shared, loaded machine and the segments take ~0.01-0.03 ms; the noise rule
    # itself is tested exactly below
    r = _bench(bundle, "--baseline", str(measured), "--tolerance", "3.0")
    assert r.exit_code == 0, r.output + r.stderr
    assert "regressed" not in r.output


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(model_sha256="f" * 64), "another model"),
    (lambda d: d.update(threads=4), "--threads"),
    (lambda d: [s.update(key="orin:" + s["key"]) for s in d["segments"]] and d["end_to_end"].update(key="x"),
     "no segment of the baseline matches"),
    (lambda d: d.update(kind="Plan"), "expected a BenchResult"),
])
def test_incompatible_baseline_is_a_user_error(measured, bundle, tmp_path, edit, message):
    r = _bench(bundle, "--baseline", str(_edited(measured, tmp_path, edit)))
    assert r.exit_code == 2, r.output + r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_regression_counts_only_when_the_remeasurement_confirms_it(measured):
    base = BenchResult.load(measured)
    seg = base.segments[0]
    slow = dataclasses.replace(base, segments=(dataclasses.replace(seg, median_ms=seg.median_ms * 2 + 1),
                                               *base.segments[1:]))
    asked = []

    def fresh(value):
        def remeasure(keys):
            asked.append(list(keys))
            return {k: value for k in keys}
        return remeasure

    noise = compare(slow, base, 0.15, 0.01, fresh(seg.median_ms))
    assert asked[-1] == [seg.key] and not noise.regressions
    assert {r.key: r.status for r in noise.rows}[seg.key] == "noise"
    real = compare(slow, base, 0.15, 0.01, fresh(seg.median_ms * 2 + 1))
    assert [r.key for r in real.regressions] == [seg.key]
    same = compare(base, base, 0.15, 0.01, fresh(0.0))
    assert {r.status for r in same.rows} == {"ok", "not measurable"} and len(asked) == 2   # nothing to confirm
    tiny = compare(dataclasses.replace(base, end_to_end=dataclasses.replace(
        base.end_to_end, median_ms=base.end_to_end.median_ms + 0.005)), base, 0.0001, 0.01, fresh(1e9))
    assert {r.key: r.status for r in tiny.rows}[END_TO_END] == "ok"      # below --min-delta-ms
