"""Batch augmentation and normalisation on uint8 tensors, all in torch.

The cache holds ``S x S`` RGB crops (S = 256). Training draws one random affine per image
(scale / aspect = random resized crop, shift, small rotation, mirror) and samples the
224 x 224 output with one ``grid_sample`` call for the whole batch; evaluation takes the
centre 224 crop, exactly what the ONNX preprocessing does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths.

    Args:
        min_area: smallest crop area as a fraction of the cached image.
        max_area: largest crop area fraction.
        max_aspect: largest aspect change (and its inverse).
        max_rotation_deg: rotation range (plus or minus).
        flip_p: probability of a horizontal mirror.
        low_res_p: probability of passing an image through a smaller size and back, as a
            far face from a street camera arrives (0 turns it off).
        low_res_min_px: smallest side of that detour, in pixels.
        colour_jitter: largest relative change of brightness, contrast and saturation
            (0 turns it off); cameras differ in exposure and white balance.
    """

    min_area: float = 0.5
    max_area: float = 1.0
    max_aspect: float = 4 / 3
    max_rotation_deg: float = 15.0
    flip_p: float = 0.5
    low_res_p: float = 0.0
    low_res_min_px: int = 24
    colour_jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip_p", "low_res_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {getattr(self, name)}")
        if not 0.0 <= self.colour_jitter < 1.0:
            # At 1 or more a factor can reach zero or below: black or inverted images.
            raise ValueError(f"colour_jitter must be within 0..1 (exclusive), got "
                             f"{self.colour_jitter}")
        if self.low_res_min_px < 4:
            raise ValueError(f"low_res_min_px must be at least 4, got {self.low_res_min_px}")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``N x H x W x 3`` uint8 -> ``N x 3 x H x W`` float in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x: torch.Tensor, grayscale: bool) -> torch.Tensor:
    """ImageNet mean/std normalisation; grey-scale replicates the luma to three channels."""
    if grayscale:
        w = torch.tensor(GREY_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def centre_crop(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Centre ``size`` crop of an ``N x 3 x H x W`` batch."""
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def eval_batch(images_u8: torch.Tensor, grayscale: bool, size: int = 224) -> torch.Tensor:
    """Evaluation transform: centre crop, scale to [0, 1], normalise."""
    return normalise(centre_crop(to_float(images_u8), size), grayscale).contiguous()


def train_batch(images_u8: torch.Tensor, grayscale: bool, generator: torch.Generator,
                cfg: AugmentConfig | None = None, size: int = 224) -> torch.Tensor:
    """Random resized crop + shift + rotation + mirror, then normalise."""
    cfg = cfg or AugmentConfig()
    x = to_float(images_u8)
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    # Fraction of the cached image's area; the evaluation crop is (224/256)^2 = 0.77.
    area = uniform(cfg.min_area, cfg.max_area)
    log_ratio = uniform(-math.log(cfg.max_aspect), math.log(cfg.max_aspect))
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (1 - sx) * uniform(-1, 1)
    ty = (1 - sy) * uniform(-1, 1)
    angle = torch.deg2rad(uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    flip = torch.where(torch.rand(n, generator=generator) < cfg.flip_p, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([sx * cos * flip, -sy * sin, tx], 1),
        torch.stack([sx * sin * flip, sy * cos, ty], 1),
    ], 1)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    if cfg.low_res_p > 0:
        out = _low_resolution(out, generator, cfg.low_res_p, cfg.low_res_min_px)
    if cfg.colour_jitter > 0:
        out = _colour_jitter(out, generator, cfg.colour_jitter)
    return normalise(out, grayscale).contiguous()


def _low_resolution(x: torch.Tensor, generator: torch.Generator, p: float,
                    min_px: int) -> torch.Tensor:
    """Down-sample a random subset of the batch to one random side and back up.

    One side per batch keeps it a single interpolate call; the subset still varies per image.
    """
    n, _, h, w = x.shape
    pick = torch.rand(n, generator=generator) < p
    if not bool(pick.any()):
        return x
    # Sides from min_px up to half the image; a min_px at or above half still shrinks.
    top = min(max(min_px + 1, h // 2), h)
    side = int(torch.randint(min(min_px, top - 1), top, (1,), generator=generator))
    small = F.interpolate(x[pick], size=(side, side), mode="area")
    x = x.clone()
    x[pick] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return x


def _colour_jitter(x: torch.Tensor, generator: torch.Generator,
                   strength: float) -> torch.Tensor:
    """Random brightness, contrast and saturation per image, clamped to [0, 1]."""
    n = x.shape[0]

    def factor() -> torch.Tensor:
        return (1 + strength * (2 * torch.rand(n, generator=generator) - 1)).view(n, 1, 1, 1)

    x = x * factor()
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    grey = (x * torch.tensor(GREY_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - grey) * factor() + grey
    return x.clamp_(0.0, 1.0)
