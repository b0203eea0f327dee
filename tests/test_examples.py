"""The shipped Fashion-MNIST example: the IDX loader on Debian's real files, the calibration/test npz
files, and the committed ONNX models, which must still reach the accuracy recorded in models.json."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fashion_mnist"
ACCURACY_TOLERANCE = 0.001   # numerical differences between ORT builds only, never a worse model
MIN_FINAL_ACCURACY = {"plain": 0.91, "exits": 0.90}   # what the README promises, whatever models.json says


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fashion_mnist_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


data = _load("data")
evaluate = _load("evaluate")
MODELS = json.loads((EXAMPLE / "models.json").read_text())["models"]


@pytest.fixture(scope="module")
def train_split():
    return data.load_split("train")


@pytest.fixture(scope="module")
def test_split():
    return data.load_split("t10k")


def test_real_files_have_expected_shapes_and_labels(train_split, test_split):
    for split, count in ((train_split, 60000), (test_split, 10000)):
        assert split.images.shape == (count, 28, 28) and split.images.dtype == np.uint8
        assert split.labels.shape == (count,) and split.labels.dtype == np.int64
        assert sorted(np.unique(split.labels)) == list(range(10))
    # Fashion-MNIST is balanced: 6,000 / 1,000 images per class
    assert np.bincount(train_split.labels).tolist() == [6000] * 10
    assert np.bincount(test_split.labels).tolist() == [1000] * 10


def test_missing_package_names_the_apt_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_split("train", data_dir=tmp_path)


def test_wrong_magic_number_is_rejected(tmp_path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:   # a labels header where images belong
        f.write((0x801).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes(2))
    with pytest.raises(ValueError, match="magic"):
        data.load_split("t10k", data_dir=tmp_path)


def test_calibration_slice_is_disjoint_from_training_and_fixed():
    fit, calib = data.train_calib_split()
    assert len(fit) == 55000 and len(calib) == 5000
    assert not np.intersect1d(fit, calib).size
    assert np.array_equal(np.union1d(fit, calib), np.arange(60000))
    assert all(np.array_equal(a, b) for a, b in zip((fit, calib), data.train_calib_split()))


def test_make_data_writes_normalized_npz(tmp_path, train_split, test_split):
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out-dir", str(tmp_path)], check=True,
                   capture_output=True)
    fit, calib_index = data.train_calib_split()
    mean, std = data.normalization(train_split.images[fit])
    for name, split, index in (("calib", train_split, calib_index), ("test", test_split, np.arange(10000))):
        with np.load(tmp_path / f"{name}.npz") as npz:
            assert npz["x"].dtype == np.float32 and npz["x"].shape == (len(index), 1, 28, 28)
            assert npz["y"].dtype == np.int64 and np.array_equal(npz["y"], split.labels[index])
            assert np.array_equal(npz["index"], index)
            assert float(npz["mean"]) == mean and float(npz["std"]) == std
            assert str(npz["normalization"]).startswith("x = (pixel / 255 - ")
            np.testing.assert_allclose(npz["x"][:, 0] * std + mean, split.images[index] / 255.0, atol=1e-6)
    assert set(calib_index).isdisjoint(fit)


@pytest.fixture(scope="module")
def test_inputs(train_split, test_split):
    fit, _ = data.train_calib_split()
    mean, std = data.normalization(train_split.images[fit])
    return data.to_input(test_split.images, mean, std), test_split.labels, (mean, std)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_committed_model_reaches_recorded_accuracy(model_name, test_inputs):
    x, y, normalization = test_inputs
    record = MODELS[model_name]
    assert (record["normalization"]["mean"], record["normalization"]["std"]) == normalization
    path = EXAMPLE / record["file"]
    names = evaluate.output_names(path)
    assert names == record["outputs"]
    assert names[0] == "logits" and all(n.startswith("exit_") for n in names[1:])
    accuracies = evaluate.onnx_accuracies(path, x, y)
    for name, recorded in record["test_accuracy"].items():
        assert accuracies[name] >= recorded - ACCURACY_TOLERANCE, (name, accuracies[name], recorded)
    assert accuracies["logits"] >= MIN_FINAL_ACCURACY[model_name]


def test_exits_model_declares_an_exit_per_head():
    record = MODELS["exits"]
    exits = [n for n in record["outputs"] if n.startswith("exit_")]
    assert len(exits) == len(record["architecture"]["exit_after_blocks"]) >= 2


def _walkthrough() -> list[str]:
    """The README walkthrough's command lines, $M expanded, without the optional ``[...]`` parts and comments."""
    text = (EXAMPLE.parent.parent / "README.md").read_text()
    block = text.split("    M=examples/fashion_mnist\n", 1)[1].split("\n\n", 1)[0]
    lines, pending = [], ""
    for raw in block.splitlines():
        line = pending + " " + raw.strip().split("#", 1)[0].strip()
        if line.endswith("\\"):                   # continued on the next line
            pending = line[:-1]
            continue
        pending = ""
        while "[" in line:
            line = line[:line.index("[")] + line[line.index("]") + 1:]
        line = line.replace("$M", str(EXAMPLE.relative_to(EXAMPLE.parent.parent))).strip().rstrip("&").strip()
        if line.startswith("distree "):
            lines.append(line)
    return lines


def test_the_walkthrough_serves_the_devices_its_compile_line_plans(tmp_path):
    """The walkthrough compiles with the wired topology and serves the Orin, the Pi 4 relaying to it: when hops came
    to be charged after idle time the plan stayed on the Pi 4 alone and `serve --device jetson-orin-nano` refused
    (the bundle had no stage there) until the compile line said --traffic steady. Its own compile line, run here."""
    commands = _walkthrough()
    compile_line, = [c for c in commands if c.startswith("distree compile ")]
    args = compile_line.split()[1:]
    assert args[args.index("-o") + 1] == "bundle/"
    args[args.index("-o") + 1] = str(tmp_path / "bundle")
    done = subprocess.run([sys.executable, "-m", "distree", *args, "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=900, cwd=EXAMPLE.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    stages = [st["name"] for st in manifest["stages"]]
    served = [c.split() for c in commands if c.startswith("distree serve ")]
    assert served, "the walkthrough serves no device"
    for words in served:
        device = words[words.index("--device") + 1]
        assert device in stages or device == manifest["source"], (device, stages, manifest["source"])
        forwards = "--next" in words
        last = device == stages[-1]
        assert forwards != last, f"{device}: --next given {forwards}, last stage {last} (stages {stages})"
