"""Calibration / test data: one ``.npz`` with ``x`` (float32 NCHW) and ``y`` (int64 labels).

Everything is checked up front against the model so that a wrong file fails with one line that says
what to change, never deep inside onnxruntime or the optimiser.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distree.errors import DistreeError

MIN_FIT_PER_CLASS = 5        # a head needs a few examples of every class to be fit at all
MIN_THRESHOLD_SAMPLES = 20   # below this a lower confidence bound says nothing


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> "Dataset":
        return Dataset(x=self.x[idx], y=self.y[idx])


def load_dataset(path: str | Path, input_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None, require_labels: bool = True) -> Dataset:
    """Read and validate ``path``; with ``input_shape`` / ``num_classes`` also check it fits the model.

    With ``require_labels=False`` (inputs to run, not to calibrate) ``y`` may be absent: ``Dataset.y`` is None.
    """
    p = Path(path)
    if not p.is_file():
        raise DistreeError(f"{p}: no such file; write an .npz with x (N,C,H,W float32) and y (N,) int64 labels")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DistreeError(f"{p}: not a readable .npz ({exc}); save it with numpy.savez(path, x=x, y=y)") from exc
    missing = [k for k in ("x", "y") if k not in arrays and (k == "x" or require_labels)]
    if missing:
        raise DistreeError(f"{p}: missing array(s) {', '.join(missing)} (has {sorted(arrays)}); "
                           "save it with numpy.savez(path, x=images, y=labels)")
    x, y = arrays["x"], arrays.get("y")
    check_dataset(Dataset(x=x, y=y if y is not None else np.zeros(len(x), dtype=np.int64)), str(p),
                  input_shape, num_classes)
    return Dataset(x=x, y=y)


def check_dataset(data: Dataset, where: str, input_shape: tuple[int, ...] | None = None,
                  num_classes: int | None = None) -> None:
    """Raise a one-line :class:`DistreeError` for the first thing wrong with ``data``."""
    x, y = data.x, data.y
    if x.dtype != np.float32:
        raise DistreeError(f"{where}: x has dtype {x.dtype}, expected float32; convert with x.astype(np.float32) "
                           "after the same normalization the model was trained with")
    if x.ndim != 4:
        raise DistreeError(f"{where}: x has shape {x.shape}, expected 4 dims (N, C, H, W); "
                           "add the channel axis, e.g. x[:, None]")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DistreeError(f"{where}: y has shape {y.shape} and dtype {y.dtype}, expected (N,) integer class labels; "
                           "store class indices, not one-hot vectors")
    if len(x) != len(y):
        raise DistreeError(f"{where}: x has {len(x)} samples but y has {len(y)}; store one label per image")
    if len(y) == 0:
        raise DistreeError(f"{where}: no samples; the file must hold at least one labelled image")
    if not np.isfinite(x).all():
        raise DistreeError(f"{where}: x contains NaN or infinite values; clean the data")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape[1:]):
        raise DistreeError(f"{where}: images have shape {tuple(x.shape[1:])}, the model expects "
                           f"{tuple(input_shape[1:])}; {layout_fix(x.shape, tuple(input_shape))}")
    if num_classes is not None:
        check_labels(y, num_classes, where)


def check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    """Labels must index the model's classes: 1-based labels would count every right answer wrong."""
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DistreeError(f"{where}: labels span {int(y.min())}..{int(y.max())}, the model has {num_classes} "
                           f"classes; labels must be class indices in 0..{num_classes - 1}")


def layout_fix(have: tuple[int, ...], want: tuple[int, ...]) -> str:
    """How to make images of shape ``have`` fit a model input ``want``: the transpose between channels-first and
    channels-last when that is all it takes (e.g. a model exported from TensorFlow takes NHWC), else a resize."""
    for perm, layout in (((0, 2, 3, 1), "channels last (NHWC)"), ((0, 3, 1, 2), "channels first (NCHW)")):
        if len(have) == len(want) == 4 and tuple(have[i] for i in perm)[1:] == tuple(want[1:]):
            return f"the model takes {layout}: save x.transpose{perm}"
    return "resize the images (or re-export the model) so that they match"


def split_fit_threshold(data: Dataset, fit_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of sample indices into (fit, threshold), both sorted.

    Heads are fit on the first part; thresholds and accuracy are estimated on the second, so the
    accuracy promise never rests on data a head has seen.
    """
    if not 0.0 < fit_fraction < 1.0:
        raise DistreeError(f"--fit-fraction {fit_fraction} must be strictly between 0 and 1, e.g. 0.5")
    rng = np.random.default_rng(seed)
    fit: list[np.ndarray] = []
    for label in np.unique(data.y):
        idx = rng.permutation(np.flatnonzero(data.y == label))
        fit.append(idx[: int(round(len(idx) * fit_fraction))])
    fit_idx = np.sort(np.concatenate(fit))
    threshold_idx = np.setdiff1d(np.arange(len(data)), fit_idx)
    if len(threshold_idx) < MIN_THRESHOLD_SAMPLES:
        raise DistreeError(f"only {len(threshold_idx)} samples are left to choose thresholds on; "
                           f"provide more calibration data or lower --fit-fraction")
    return fit_idx, threshold_idx


def check_fit_classes(y_fit: np.ndarray, num_classes: int) -> None:
    """Every class needs a few fit samples, or its head weights are meaningless."""
    counts = np.bincount(y_fit, minlength=num_classes)
    poor = [c for c in range(num_classes) if counts[c] < MIN_FIT_PER_CLASS]
    if poor:
        shown = ", ".join(f"class {c}: {counts[c]}" for c in poor[:5])
        raise DistreeError(f"too few samples per class to fit exit heads ({shown}; need >= {MIN_FIT_PER_CLASS} "
                           "in the fit split); add calibration data for those classes or raise --fit-fraction")
