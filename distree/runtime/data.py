"""Inputs for ``distree run``: ``x`` is required, ``y`` (labels) optional."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from distree.errors import DistreeError
from distree.exits import Dataset
from distree.exits.data import check_dataset


def load_inputs(path: str | Path) -> Dataset:
    """A Dataset from an .npz; without ``y`` the labels are None (no accuracy is reported)."""
    p = Path(path)
    if not p.is_file():
        raise DistreeError(f"{p}: no such file; write an .npz with x (N,C,H,W float32) and optionally y labels")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DistreeError(f"{p}: not a readable .npz ({exc}); save it with numpy.savez(path, x=x, y=y)") from exc
    if "x" not in arrays:
        raise DistreeError(f"{p}: no array x (has {sorted(arrays)}); save it with numpy.savez(path, x=images)")
    x = arrays["x"]
    y = arrays.get("y")
    check_dataset(Dataset(x=x, y=y if y is not None else np.zeros(len(x), dtype=np.int64)), str(p))
    return Dataset(x=x, y=y)
