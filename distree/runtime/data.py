"""Inputs for ``distree run``: ``x`` is required, ``y`` (labels) optional."""

from __future__ import annotations

from pathlib import Path

from distree.exits import Dataset, load_dataset


def load_inputs(path: str | Path) -> Dataset:
    """A Dataset from an .npz; without ``y`` the labels are None (no accuracy is reported)."""
    return load_dataset(path, require_labels=False)
