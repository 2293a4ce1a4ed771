"""Training-time augmentation of image batches, on the batch's device (CPU or GPU).

- :func:`crop_flip`: random crops of reflect-padded uint8 images and horizontal flips;
- :func:`rand_augment`: batched RandAugment (Cubuk et al., 2020) on uint8 images;
- :func:`cutout`: a square of each normalised float image set to 0 (the mean colour);
- :func:`mixup`: convex combinations of examples and their targets.

Randomness comes from a ``numpy.random.Generator`` the caller seeds, so the same seed gives
the same batches whatever the device.

RandAugment: each image draws ``num_ops`` operations uniformly from :data:`RANDAUGMENT_OPS`, each applied
at the same ``magnitude`` (0..30, torchvision's scale: 9 is its default) with a random sign
where the operation has one. Images are processed per operation, all images that drew it at
once, so a batch costs a few tensor operations per op rather than a Python loop per image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

RANDAUGMENT_OPS: tuple[str, ...] = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
"""The operations of torchvision's RandAugment, in its order."""

MAX_MAGNITUDE = 30
_FILL = 0.5  # grey, for pixels that geometric operations bring in from outside the image
_GREY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) -> (B, 1, H, W) luminance."""
    return (x * _GREY_WEIGHTS.to(x.device)).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor + other * (1 - factor), clamped to [0, 1]; factor (B,)."""
    factor = factor.view(-1, 1, 1, 1)
    return (other + factor * (x - other)).clamp_(0.0, 1.0)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp float (B, 3, H, W) by (B, 2, 3) affine matrices in normalised coordinates."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample x - fill and add it back, so that outside pixels (zeros) become the fill
    warped = F.grid_sample(x - _FILL, grid, mode="bilinear", align_corners=False)
    return warped + _FILL


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation of float (B, 3, H, W) in [0, 1]."""
    levels = (x * 255.0).round().long().flatten(2)  # (B, 3, HW)
    histogram = torch.zeros(*levels.shape[:2], 256, device=x.device).scatter_add_(
        2, levels, torch.ones_like(levels, dtype=torch.float32)
    )
    cdf = histogram.cumsum(dim=2)
    lowest = torch.where(histogram > 0, cdf, torch.full_like(cdf, float("inf"))).amin(dim=2)
    total = cdf[:, :, -1]
    span = (total - lowest).clamp_min(1.0)
    mapped = ((cdf - lowest[:, :, None]) / span[:, :, None]).clamp_(0.0, 1.0)
    out = torch.gather(mapped, 2, levels).view_as(x)
    flat = (total - lowest) <= 0  # a single grey level: leave the channel as it is
    return torch.where(flat[:, :, None, None], x, out)


def _apply(op: str, x: torch.Tensor, level: float, sign: torch.Tensor) -> torch.Tensor:
    """One operation on float (b, 3, H, W) in [0, 1]; ``level`` in [0, 1], sign (b,) of +-1."""
    b, _, height, width = x.shape
    if op == "identity":
        return x
    if op in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if op == "shear_x":
            theta[:, 0, 1] = sign * 0.3 * level
        elif op == "shear_y":
            theta[:, 1, 0] = sign * 0.3 * level
        elif op == "translate_x":  # up to 150/331 of the width (torchvision); 2.0 = full width
            theta[:, 0, 2] = sign * 2.0 * (150.0 / 331.0) * level
        elif op == "translate_y":
            theta[:, 1, 2] = sign * 2.0 * (150.0 / 331.0) * level
        else:
            angle = sign * math.radians(30.0) * level
            cos, sin = torch.cos(angle), torch.sin(angle)
            theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width
            theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
        return _affine(x, theta)
    factor = 1.0 + sign * 0.9 * level  # brightness, color, contrast, sharpness
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if op == "color":
        return _blend(x, _grey(x).expand_as(x), factor)
    if op == "contrast":
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean.expand_as(x), factor)
    if op == "sharpness":
        kernel = (
            torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device)
            / 13.0
        )
        smooth = F.conv2d(x, kernel.expand(3, 1, 3, 3), padding=1, groups=3)
        smooth[:, :, 0, :], smooth[:, :, -1, :] = x[:, :, 0, :], x[:, :, -1, :]
        smooth[:, :, :, 0], smooth[:, :, :, -1] = x[:, :, :, 0], x[:, :, :, -1]
        return _blend(x, smooth, factor)
    if op == "posterize":
        bits = 8 - int(round(4 * level))
        step = float(2 ** (8 - bits))
        return torch.floor(x * 255.0 / step) * step / 255.0
    if op == "solarize":
        threshold = 1.0 - level
        return torch.where(x >= threshold, 1.0 - x, x)
    if op == "autocontrast":
        low = x.amin(dim=(2, 3), keepdim=True)
        high = x.amax(dim=(2, 3), keepdim=True)
        scale = torch.where(high > low, 1.0 / (high - low).clamp_min(1e-6), torch.ones_like(high))
        low = torch.where(high > low, low, torch.zeros_like(low))
        return ((x - low) * scale).clamp_(0.0, 1.0)
    if op == "equalize":
        return _equalize(x)
    raise ValueError(f"unknown RandAugment operation {op!r}; choose from {RANDAUGMENT_OPS}.")


def rand_augment(
    images: torch.Tensor, rng: np.random.Generator, num_ops: int = 2, magnitude: int = 9
) -> torch.Tensor:
    """RandAugment on a batch of uint8 images.

    Args:
        images: uint8 (B, H, W, 3).
        rng: source of the operation choices and signs.
        num_ops: operations applied to each image, one after the other (0: no change).
        magnitude: strength of every operation, 0..30 (torchvision's scale).

    Returns:
        uint8 (B, H, W, 3), a new tensor (or ``images`` itself when ``num_ops`` is 0).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"rand_augment needs uint8 images (B, H, W, 3); got {images.dtype} "
            f"{tuple(images.shape)}."
        )
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"magnitude must be in 0..{MAX_MAGNITUDE}; got {magnitude}.")
    if num_ops <= 0:
        return images
    level = magnitude / MAX_MAGNITUDE
    batch = images.shape[0]
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    choices = rng.integers(0, len(RANDAUGMENT_OPS), size=(num_ops, batch))
    signs = torch.from_numpy(np.where(rng.random((num_ops, batch)) < 0.5, -1.0, 1.0))
    signs = signs.float().to(images.device)
    for round_choices, round_signs in zip(choices, signs, strict=True):
        for op_index in np.unique(round_choices):
            chosen = torch.from_numpy(np.flatnonzero(round_choices == op_index)).to(images.device)
            op = RANDAUGMENT_OPS[int(op_index)]
            if op == "identity":
                continue
            x[chosen] = _apply(op, x[chosen], level, round_signs[chosen])
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad indices (no edge repeat) into [0, size)."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


def crop_flip(images: torch.Tensor, rng: np.random.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crops of reflect-padded images and random horizontal flips, in one gather.

    Args:
        images: uint8 (B, H, W, 3), on any device.
        rng: source of the crop offsets and flips.
        pad: padding on each side (0: no crop).
        flip: mirror each image with probability 1/2.

    Returns:
        uint8 (B, H, W, 3) on the same device.
    """
    batch, height, width = images.shape[:3]
    if pad == 0 and not flip:
        return images
    dy = rng.integers(-pad, pad + 1, size=batch) if pad else np.zeros(batch, np.int64)
    dx = rng.integers(-pad, pad + 1, size=batch) if pad else np.zeros(batch, np.int64)
    rows = _reflect(dy[:, None] + np.arange(height)[None, :], height)
    cols = _reflect(dx[:, None] + np.arange(width)[None, :], width)
    if flip:
        mirrored = rng.random(batch) < 0.5
        cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
    device = images.device
    b = torch.arange(batch, device=device)[:, None, None]
    rows_t = torch.from_numpy(rows).to(device)[:, :, None]
    cols_t = torch.from_numpy(np.ascontiguousarray(cols)).to(device)[:, None, :]
    return images[b, rows_t, cols_t]


def cutout(images: torch.Tensor, rng: np.random.Generator, size: int) -> torch.Tensor:
    """Set a size x size square (clipped at the border) of each image to 0 (the mean colour
    after normalisation), at a uniformly random centre.

    Args:
        images: float (B, 3, H, W), normalised, on any device.

    Returns:
        float (B, 3, H, W), a new tensor on the same device.
    """
    batch, _, height, width = images.shape
    device = images.device
    cy = torch.from_numpy(rng.integers(0, height, size=batch)).to(device)
    cx = torch.from_numpy(rng.integers(0, width, size=batch)).to(device)
    ys = torch.arange(height, device=device)[None, :] - cy[:, None] + size // 2  # 0..size-1 inside
    xs = torch.arange(width, device=device)[None, :] - cx[:, None] + size // 2
    inside = ((ys >= 0) & (ys < size))[:, :, None] & ((xs >= 0) & (xs < size))[:, None, :]
    return images.masked_fill(inside[:, None, :, :], 0.0)


def mixup(
    inputs: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with another of the batch: lam ~ Beta(alpha, alpha).

    Args:
        inputs: float (B, ...).
        targets: float (B, C) probabilities.

    Returns:
        mixed inputs and mixed target probabilities (same device as the inputs).
    """
    lam = float(rng.beta(alpha, alpha))
    order = torch.from_numpy(rng.permutation(inputs.shape[0])).to(inputs.device)
    return lam * inputs + (1 - lam) * inputs[order], lam * targets + (1 - lam) * targets[order]
