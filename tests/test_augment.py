"""Batched RandAugment (dpq.training.augment) on small synthetic image batches."""

import numpy as np
import pytest
import torch

from dpq.training.augment import RANDAUGMENT_OPS, _apply, crop_flip, cutout, mixup, rand_augment


def images(batch=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))


def as_float(x):
    return x.permute(0, 3, 1, 2).float() / 255.0


def test_rand_augment_keeps_shape_and_dtype_and_is_seeded():
    x = images()
    a = rand_augment(x, np.random.default_rng(1), num_ops=2, magnitude=9)
    b = rand_augment(x, np.random.default_rng(1), num_ops=2, magnitude=9)
    c = rand_augment(x, np.random.default_rng(2), num_ops=2, magnitude=9)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert rand_augment(x, np.random.default_rng(1), num_ops=0) is x


@pytest.mark.parametrize(
    "op", [op for op in RANDAUGMENT_OPS if op not in ("solarize", "autocontrast", "equalize")]
)
def test_every_op_with_a_strength_is_the_identity_at_magnitude_zero(op):
    x = as_float(images())
    out = _apply(op, x.clone(), 0.0, torch.ones(len(x)))
    assert torch.allclose(out, x, atol=1e-5)


def test_translate_moves_the_image_and_fills_with_grey():
    x = as_float(images(batch=2, size=16))
    pixels = 4
    level = pixels / (16 * 150.0 / 331.0)  # translate_x moves up to 150/331 of the width
    out = _apply("translate_x", x.clone(), level, torch.ones(2))
    assert torch.allclose(out[..., : 16 - pixels], x[..., pixels:], atol=1e-5)
    assert torch.allclose(out[..., 16 - pixels :], torch.full_like(out[..., :pixels], 0.5))


def test_colour_ops_follow_their_definitions():
    x = as_float(images())
    ones = torch.ones(len(x))
    brighter = _apply("brightness", x.clone(), 0.5, ones)  # factor 1.45
    assert torch.allclose(brighter, (x * 1.45).clamp(0, 1), atol=1e-6)
    solarized = _apply("solarize", x.clone(), 0.25, ones)  # threshold 0.75
    assert torch.allclose(solarized, torch.where(x >= 0.75, 1 - x, x))
    posterized = _apply("posterize", x.clone(), 1.0, ones)  # 4 bits
    assert torch.allclose(posterized * 255, torch.floor(x * 255 / 16) * 16, atol=1e-3)
    grey = _apply("color", x.clone(), 1.0, -ones)  # factor 0.1: nearly grey
    assert (grey.max(1).values - grey.min(1).values).max() < (
        x.max(1).values - x.min(1).values
    ).max()


def test_autocontrast_and_equalize_stretch_each_channel_and_keep_its_order():
    x = as_float(images()) * 0.5 + 0.2  # values in [0.2, 0.7]
    for op in ("autocontrast", "equalize"):
        out = _apply(op, x.clone(), 0.0, torch.ones(len(x)))
        assert torch.allclose(out.amin(dim=(2, 3)), torch.zeros(len(x), 3), atol=1e-6)
        assert torch.allclose(out.amax(dim=(2, 3)), torch.ones(len(x), 3), atol=1e-6)
        flat_in, flat_out = x.flatten(2), out.flatten(2)
        order = flat_in.argsort(dim=2)
        assert (torch.gather(flat_out, 2, order).diff(dim=2) >= -1e-6).all()
    constant = torch.full((1, 3, 8, 8), 0.4)
    assert torch.equal(_apply("equalize", constant.clone(), 0.0, torch.ones(1)), constant)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8 images"):
        rand_augment(as_float(images()), np.random.default_rng(0))
    with pytest.raises(ValueError, match="0..30"):
        rand_augment(images(), np.random.default_rng(0), magnitude=31)


def test_crop_flip_is_a_reflect_padded_crop():
    images = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    )
    assert torch.equal(crop_flip(images, np.random.default_rng(1), 0, False), images)
    out = crop_flip(images, np.random.default_rng(1), 2, True).numpy()
    padded = np.pad(images.numpy(), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    for i in range(6):
        candidates = [
            crop
            for y in range(5)
            for x in range(5)
            for crop in (padded[i, y : y + 5, x : x + 7], padded[i, y : y + 5, x : x + 7][:, ::-1])
        ]
        assert any(np.array_equal(out[i], c) for c in candidates)


def test_cutout_zeroes_one_square():
    images = torch.ones(4, 3, 10, 10)
    out = cutout(images, np.random.default_rng(0), 4)
    zeros = (out == 0).all(dim=1)  # (B, H, W)
    for i in range(4):
        count = int(zeros[i].sum())
        assert 4 <= count <= 16
        rows, cols = torch.nonzero(zeros[i], as_tuple=True)
        assert count == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert torch.equal(images, torch.ones(4, 3, 10, 10))


def test_mixup_mixes_inputs_and_targets_with_one_weight():
    inputs = torch.arange(12, dtype=torch.float32).view(4, 3)
    targets = torch.eye(4)
    mixed, mixed_targets = mixup(inputs, targets, np.random.default_rng(0), 0.4)
    assert torch.allclose(mixed_targets.sum(dim=1), torch.ones(4))
    assert not torch.equal(mixed_targets, targets)
    # the convex weights that mixed the one-hot targets mixed the inputs too
    torch.testing.assert_close(mixed, mixed_targets @ inputs)
