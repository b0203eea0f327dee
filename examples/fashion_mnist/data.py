"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read with numpy only.

The training set is split once, with a fixed seed, into the images the example models train on and a
held-out calibration slice that distree uses to place exits and pick thresholds. Both the training script
and ``make_data.py`` take the split from :func:`train_calib_split`, so the two can never overlap.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist`"
IMAGES_MAGIC = 0x00000803   # IDX: unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801   # IDX: unsigned byte, 1 dimension
NUM_CLASSES = 10
CALIB_SIZE = 5000
SPLIT_SEED = 20240501
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass(frozen=True)
class RawSplit:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,), exactly as stored in the IDX files."""

    images: np.ndarray
    labels: np.ndarray


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file {path} is missing; {INSTALL_HINT}")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, need a {header_len}-byte IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path} has IDX magic {found:#010x}, expected {magic:#010x}; is it the right file?")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) + header_len
    if len(raw) != expected:
        raise ValueError(f"{path} has {len(raw)} bytes, its header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_split(split: str, data_dir: Path = DATA_DIR) -> RawSplit:
    """Read ``split`` ("train" or "t10k") and check that images and labels agree."""
    if split not in ("train", "t10k"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 't10k'")
    images = _read_idx(Path(data_dir) / f"{split}-images-idx3-ubyte.gz", IMAGES_MAGIC, 3)
    labels = _read_idx(Path(data_dir) / f"{split}-labels-idx1-ubyte.gz", LABELS_MAGIC, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{split}: labels outside 0..{NUM_CLASSES - 1}")
    return RawSplit(images=images, labels=labels)


def train_calib_split(n_train: int = 60000, calib_size: int = CALIB_SIZE,
                      seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, calib) into the training set: a seeded permutation, calib is its first slice."""
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[calib_size:]), np.sort(order[:calib_size])


def normalization(train_images: np.ndarray) -> tuple[float, float]:
    """Mean and std of the training pixels scaled to [0, 1], the constants every model input uses."""
    pixels = train_images.astype(np.float64) / 255.0
    return float(pixels.mean()), float(pixels.std())


def to_input(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 (N, 28, 28) -> normalized float32 NCHW (N, 1, 28, 28)."""
    x = (images.astype(np.float32) / np.float32(255.0) - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x[:, None, :, :], dtype=np.float32)
