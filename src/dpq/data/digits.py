"""scikit-learn's bundled handwritten digits: the default data set (no download)."""

from __future__ import annotations

import numpy as np

from dpq.data.dataset import ImageDataset


def load_digits() -> ImageDataset:
    """The 1,797 8x8 digit images of scikit-learn as an RGB ``ImageDataset``.

    Returns images uint8 (1797, 8, 8, 3): the 0..16 gray levels scaled to 0..255 (rounded)
    and repeated over three channels; labels int64 (1797,) in 0..9; classes '0'..'9'.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    gray = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return ImageDataset(images, labels, [str(d) for d in range(10)], "sklearn.datasets.load_digits")
