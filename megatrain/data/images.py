"""Image classification data: the embedded digits set, folders of images, ``.npz`` arrays.

Sources (``data.dataset``):
  digits  scikit-learn's bundled 1,797 real 8×8 handwritten digits (no download), pixels 0..16 scaled to [0, 1].
  images  ``data.path`` holds one sub-folder per class (sorted names are the class ids) of image files, read
          with Pillow; all images must share one size; converted to L (in_channels=1) or RGB (in_channels=3).
  npz     ``data.path`` is an ``.npz`` with ``x`` (N, H, W), (N, H, W, C) or (N, C, H, W) images — uint8 in
          0..255 or floats in [0, 1] — and ``y`` (N,) integer labels; optional ``class_names``.

The train/validation split is stratified and depends only on the split seed, so every run, trial, fold and
ensemble member that shares the seed evaluates on the same samples. Mean/std per channel come from the
training split only (using validation pixels would leak them into training).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset
from megatrain.errors import DataError


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class ImageArrays:
    x: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    y: np.ndarray  # (N,) int64
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.y.max()) + 1


def load_digits_arrays() -> ImageArrays:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    return ImageArrays(x, d.target.astype(np.int64), [str(c) for c in d.target_names])


def _to_nchw(x: np.ndarray, path: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"data.path={path}: x has shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W)")
    # channels-last when the last axis looks like channels and the second does not
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.transpose(0, 3, 1, 2)
    return x


def load_npz_arrays(path: str) -> ImageArrays:
    if not os.path.isfile(path):
        raise DataError(f"data.path={path}: no such .npz file; point data.path at an .npz with arrays x and y")
    with np.load(path, allow_pickle=False) as f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise DataError(f"data.path={path}: missing array(s) {sorted(missing)}; save with np.savez(path, x=..., y=...)")
        x, y = f["x"], f["y"]
        names = [str(n) for n in f["class_names"]] if "class_names" in f.files else []
    if len(x) != len(y):
        raise DataError(f"data.path={path}: x has {len(x)} samples but y has {len(y)}; they must match")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"data.path={path}: y must be a 1-D array of non-negative integer class ids")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = _to_nchw(x, path).astype(np.float32) / scale
    return ImageArrays(np.ascontiguousarray(x), y.astype(np.int64), names)


def load_image_folder(path: str, *, in_channels: int) -> ImageArrays:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("data.dataset=images needs Pillow; pip install pillow (or convert the images to an .npz)") from None
    if not os.path.isdir(path):
        raise DataError(f"data.path={path}: no such folder; give a folder with one sub-folder of images per class")
    if in_channels not in (1, 3):
        raise DataError(f"model.in_channels={in_channels}: image folders load as 1 (grayscale) or 3 (RGB) channels")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise DataError(f"data.path={path}: no class sub-folders; put each class's images in its own sub-folder")
    xs, ys, size = [], [], None
    for label, name in enumerate(classes):
        folder = os.path.join(path, name)
        for fname in sorted(os.listdir(folder)):
            if not fname.lower().endswith(IMAGE_SUFFIXES):
                continue
            fpath = os.path.join(folder, fname)
            with Image.open(fpath) as im:
                arr = np.asarray(im.convert("L" if in_channels == 1 else "RGB"), dtype=np.uint8)
            if size is None:
                size = arr.shape[:2]
            elif arr.shape[:2] != size:
                raise DataError(f"data.path={path}: {fpath} is {arr.shape[1]}x{arr.shape[0]} but earlier images are "
                                 f"{size[1]}x{size[0]}; resize all images to one size first")
            xs.append(arr)
            ys.append(label)
    if not xs:
        raise DataError(f"data.path={path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    x = np.stack(xs).astype(np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, C, H, W)
    return ImageArrays(np.ascontiguousarray(x), np.asarray(ys, dtype=np.int64), classes)


def load_image_arrays(dataset: str, path: str, *, in_channels: int) -> ImageArrays:
    if dataset == "digits":
        arrays = load_digits_arrays()
    elif dataset == "npz":
        arrays = load_npz_arrays(path)
    elif dataset == "images":
        arrays = load_image_folder(path, in_channels=in_channels)
    else:
        raise DataError(f"data.dataset={dataset} is not image data; use digits, images or npz")
    if arrays.x.shape[1] != in_channels:
        raise DataError(f"model.in_channels={in_channels} but the {dataset} data has {arrays.x.shape[1]} channel(s); "
                         f"set model.in_channels={arrays.x.shape[1]}")
    return arrays


def stratified_split(labels: np.ndarray, val_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train_idx, val_idx): each class keeps ~val_fraction of its samples for validation (at least one
    when it has two or more and val_fraction > 0), shuffled by ``seed`` alone."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(val_fraction * len(idx)))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of (N, C, H, W) images (float64 accumulation; std floored to avoid /0)."""
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x.std(axis=(0, 2, 3), dtype=np.float64)
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


class ImageDataset(Dataset):
    """Items ``{"image": (C, H, W) float32 in [0, 1], "label": int64, "index": int64}`` of ``indices``.

    Pixels stay raw: normalisation and augmentation run batched on the training device in the task
    (:func:`normalize`, :func:`megatrain.data.augment.augment_batch`), keyed on ``index`` — the sample's
    position in the full pool, so a sample's augmentation does not depend on which split or fold holds it.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, indices: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.ascontiguousarray(y))
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.indices[i])
        return {"image": self.x[j], "label": self.y[j], "index": torch.tensor(j)}


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) [0, 1] pixels -> zero-mean unit-std per channel with the training split's (C,) statistics."""
    mean = mean.to(images.device, images.dtype).view(1, -1, 1, 1)
    std = std.to(images.device, images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


class TokenSequenceDataset(Dataset):
    """Items ``{"input_ids": (T,) int64, "length": int64, "label": int64, "index": int64}`` for RNN classifiers."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, y: np.ndarray, indices: np.ndarray):
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.lengths = torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64))
        self.y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.indices[i])
        return {"input_ids": self.tokens[j], "length": self.lengths[j], "label": self.y[j], "index": torch.tensor(j)}


@dataclass
class SequenceArrays:
    tokens: np.ndarray  # (N, T) int64, right-padded
    lengths: np.ndarray  # (N,) int64
    y: np.ndarray  # (N,) int64
    vocab_size: int
    class_names: list[str] = field(default_factory=list)


def load_sequence_arrays(dataset: str, path: str) -> SequenceArrays:
    """Token sequences for RNN classification.

    digits: each 8×8 digit read row by row as 64 tokens of its pixel intensity 0..16 (vocab 17) — a real
    sequence task (the class must be inferred from a scan) with no download. npz: ``x`` (N, T) integer token
    ids right-padded, ``y`` (N,) labels, optional ``lengths`` (N,) (default: all T).
    """
    if dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        tokens = d.images.reshape(len(d.images), -1).astype(np.int64)  # (1797, 64) values 0..16
        return SequenceArrays(tokens, np.full(len(tokens), tokens.shape[1], dtype=np.int64),
                              d.target.astype(np.int64), 17, [str(c) for c in d.target_names])
    if dataset != "npz":
        raise DataError(f"data.dataset={dataset} is not supported for RNN classification; use digits or npz")
    if not os.path.isfile(path):
        raise DataError(f"data.path={path}: no such .npz file; save token ids with np.savez(path, x=ids, y=labels)")
    with np.load(path, allow_pickle=False) as f:
        if not {"x", "y"} <= set(f.files):
            raise DataError(f"data.path={path}: needs arrays x (N, T) token ids and y (N,) labels")
        x, y = f["x"], f["y"]
        lengths = f["lengths"] if "lengths" in f.files else np.full(len(x), x.shape[1] if x.ndim == 2 else 0)
        names = [str(n) for n in f["class_names"]] if "class_names" in f.files else []
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"data.path={path}: x must be a 2-D integer array of token ids (N, T) for an RNN classifier")
    if len(x) != len(y) or len(lengths) != len(x):
        raise DataError(f"data.path={path}: x, y (and lengths) must have the same number of rows")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > x.shape[1]):
        raise DataError(f"data.path={path}: lengths must lie in [1, {x.shape[1]}]")
    return SequenceArrays(x.astype(np.int64), lengths.astype(np.int64), y.astype(np.int64), int(x.max()) + 1, names)
