"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (gzip idx files, no download)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV_VAR = "CHAMELEON_FUSION_FASHION_MNIST"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

_FILE_PREFIX = {"train": "train", "test": "t10k"}


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the idx files: `root`, else $CHAMELEON_FUSION_FASHION_MNIST, else Debian's."""
    return Path(root or os.environ.get(ROOT_ENV_VAR) or DEFAULT_ROOT)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (big-endian header: magic, then one uint32 per dimension) as a uint8 array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path} is not an idx file of the expected kind (magic {found:#x}, wanted {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 (0 = background) and labels (N,) int64 of the "train" or "test" split."""
    if split not in _FILE_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_root(root)
    images_path = folder / f"{_FILE_PREFIX[split]}-images-idx3-ubyte.gz"
    labels_path = folder / f"{_FILE_PREFIX[split]}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found. Install it with `sudo apt-get install "
                f"dataset-fashion-mnist`, or point `root=` or ${ROOT_ENV_VAR} to a folder holding "
                f"{images_path.name} and {labels_path.name}."
            )
    images = _read_idx(images_path, magic=0x0803)
    labels = _read_idx(labels_path, magic=0x0801).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels


__all__ = ["FASHION_MNIST_CLASSES", "load_fashion_mnist", "fashion_mnist_root"]
