"""On-the-fly image augmentation with torch ops, reproducible per (seed, epoch, sample index).

One random affine map per image — rotation, isotropic scaling, translation (a random crop of a zero- or
reflection-padded image is a translation) and optional flips — applied with ``affine_grid``/``grid_sample``
in a single resampling, so stacking transforms costs one interpolation, not one per transform.

The random draw for an image depends only on ``(seed, epoch, index)``: any rank, worker process or restarted
run that loads sample ``index`` in ``epoch`` gets the same pixels, whatever order samples are visited in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from megatrain.errors import DataError


@dataclass(frozen=True)
class AugmentSpec:
    rotation_deg: float = 10.0  # uniform in ±rotation_deg
    scale: tuple[float, float] = (0.9, 1.1)  # uniform zoom factor
    translate: float = 0.1  # uniform shift in ±translate × image size, per axis
    hflip: float = 0.0  # probability of a horizontal flip
    vflip: float = 0.0  # probability of a vertical flip
    padding_mode: str = "zeros"  # grid_sample fill outside the image: zeros | border | reflection

    def __post_init__(self):
        if self.rotation_deg < 0 or self.translate < 0:
            raise DataError("augment: rotation_deg and translate must be >= 0")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise DataError(f"augment: scale={self.scale} must satisfy 0 < low <= high")
        if not (0 <= self.hflip <= 1 and 0 <= self.vflip <= 1):
            raise DataError("augment: hflip and vflip are probabilities in [0, 1]")
        if self.padding_mode not in ("zeros", "border", "reflection"):
            raise DataError(f"augment: padding_mode={self.padding_mode!r} is not zeros, border or reflection")


# Flips change a digit's identity (a mirrored 2 is no 2; a 6 upside-down is a 9), so digits get none; augmentation
# runs before normalisation, where 0 is the digits' black background, so zero fill matches it.
DIGITS = AugmentSpec(rotation_deg=12.0, scale=(0.9, 1.1), translate=0.125, hflip=0.0, padding_mode="zeros")
# Photos of objects are mirror-symmetric in distribution; reflection fill avoids black corners.
NATURAL = AugmentSpec(rotation_deg=10.0, scale=(0.9, 1.15), translate=0.1, hflip=0.5, padding_mode="reflection")
# Unknown user arrays: geometric jitter only, no flips (text, digits, medical scans are not mirror-safe).
GENERIC = AugmentSpec(rotation_deg=8.0, scale=(0.92, 1.08), translate=0.08, hflip=0.0, padding_mode="border")

PRESETS = {"digits": DIGITS, "images": NATURAL, "npz": GENERIC}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one (seed, epoch, index); neighbouring triples get unrelated streams."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def random_affine(spec: AugmentSpec, generator: torch.Generator, n: int = 1) -> torch.Tensor:
    """(n, 2, 3) affine matrices in affine_grid's normalised coordinates (output pixel -> input pixel)."""
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)  # one draw per parameter, fixed order
    angle = (2 * u[:, 0] - 1) * math.radians(spec.rotation_deg)
    scale = spec.scale[0] + u[:, 1] * (spec.scale[1] - spec.scale[0])
    # translate is a fraction of the image size; normalised coordinates span 2 per image side
    tx = (2 * u[:, 2] - 1) * spec.translate * 2
    ty = (2 * u[:, 3] - 1) * spec.translate * 2
    fx = torch.where(u[:, 4] < spec.hflip, -1.0, 1.0)
    fy = torch.where(u[:, 5] < spec.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # inverse map: zoom in = sample a smaller area
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * fx, -sin * fy, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * fx, cos * fy, ty
    return theta.float()


def apply_affine(images: torch.Tensor, theta: torch.Tensor, *, padding_mode: str = "zeros") -> torch.Tensor:
    """(N, C, H, W) float images, (N, 2, 3) maps -> (N, C, H, W) bilinearly resampled images."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def augment_image(image: torch.Tensor, spec: AugmentSpec, *, seed: int, epoch: int, index: int) -> torch.Tensor:
    """(C, H, W) -> (C, H, W), the same output for the same (seed, epoch, index) on every process."""
    gen = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    theta = random_affine(spec, gen)  # (1, 2, 3)
    return apply_affine(image.unsqueeze(0), theta, padding_mode=spec.padding_mode).squeeze(0)


def augment_batch(images: torch.Tensor, indices: torch.Tensor, spec: AugmentSpec, *, seed: int,
                  epoch: int) -> torch.Tensor:
    """(N, C, H, W) with their (N,) dataset indices -> augmented batch; equals per-image augment_image."""
    thetas = []
    for idx in indices.tolist():
        gen = torch.Generator().manual_seed(sample_seed(seed, epoch, int(idx)))
        thetas.append(random_affine(spec, gen))
    theta = torch.cat(thetas).to(images.device)  # (N, 2, 3)
    return apply_affine(images, theta, padding_mode=spec.padding_mode)
