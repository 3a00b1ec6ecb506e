"""A small segmentation set from real textures shipped with scikit-image: each image is a mosaic of brick,
grass and gravel patches, and its mask says which texture each pixel shows (classes 0, 1, 2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ['brick', 'grass', 'gravel']


def mosaic(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image uint8, mask uint8): a background texture and two rectangles of other textures."""
    from skimage import data
    textures = [getattr(data, name)() for name in CLASSES]

    def patch(cls: int) -> np.ndarray:
        texture = textures[cls]
        top, left = rng.integers(0, texture.shape[0] - size, 2)
        return texture[top:top + size, left:left + size]
    background = int(rng.integers(3))
    image, mask = patch(background).copy(), np.full((size, size), background, np.uint8)
    for cls in rng.permutation([c for c in range(3) if c != background]):
        h, w = rng.integers(size // 4, size // 2 + 1, 2)
        top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        image[top:top + h, left:left + w] = patch(int(cls))[top:top + h, left:left + w]
        mask[top:top + h, left:left + w] = cls
    return np.repeat(image[..., None], 3, axis=2), mask


def write_folder(root: Path, count: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    (root / 'masks').mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = mosaic(rng, size)
        Image.fromarray(image).save(root / 'images' / f'{i:03d}.jpg', quality=95)
        Image.fromarray(mask).save(root / 'masks' / f'{i:03d}.png')
    return root
