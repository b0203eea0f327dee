"""Write ``calib.npz`` and ``test.npz`` next to this script from Debian's Fashion-MNIST files.

``calib.npz``: the 5,000 training images held out from model training (``data.train_calib_split``).
``test.npz``: the 10,000 test images. Both: ``x`` float32 (N, 1, 28, 28) normalized with the mean/std of
the images the models were trained on, ``y`` int64 labels, ``mean``, ``std``, ``normalization`` (how ``x``
was made) and ``index`` (each sample's position in its IDX file). Deterministic; every run rewrites
the same bytes atomically, so it is safe to run again.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import data  # noqa: E402
from distree.serde import write_bytes_atomic  # noqa: E402


def dataset_arrays(images: np.ndarray, labels: np.ndarray, index: np.ndarray,
                   mean: float, std: float) -> dict[str, np.ndarray]:
    return {
        "x": data.to_input(images[index], mean, std),
        "y": labels[index].astype(np.int64),
        "mean": np.array(mean, dtype=np.float64),
        "std": np.array(std, dtype=np.float64),
        "normalization": np.array(f"x = (pixel / 255 - {mean!r}) / {std!r}"),
        "index": index.astype(np.int64),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    try:
        train, test = data.load_split("train"), data.load_split("t10k")
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    fit_index, calib_index = data.train_calib_split(len(train.labels))
    mean, std = data.normalization(train.images[fit_index])
    write_npz(args.out_dir / "calib.npz", dataset_arrays(train.images, train.labels, calib_index, mean, std))
    write_npz(args.out_dir / "test.npz",
              dataset_arrays(test.images, test.labels, np.arange(len(test.labels)), mean, std))
    print(f"wrote {args.out_dir / 'calib.npz'} ({len(calib_index)} samples) and "
          f"{args.out_dir / 'test.npz'} ({len(test.labels)} samples); mean {mean:.6f}, std {std:.6f}")


if __name__ == "__main__":
    main()
