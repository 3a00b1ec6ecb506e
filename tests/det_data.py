"""A small COCO-format detection set from real textures shipped with scikit-image: brick squares and gravel
discs pasted onto grass, with their boxes and (polygon) masks known exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{'id': 3, 'name': 'brick'}, {'id': 7, 'name': 'gravel'}]  # COCO ids need not be contiguous


def scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict]]:
    from skimage import data
    grass, brick, gravel = data.grass(), data.brick(), data.gravel()

    def patch(texture: np.ndarray, h: int, w: int) -> np.ndarray:
        top, left = rng.integers(0, texture.shape[0] - h), rng.integers(0, texture.shape[1] - w)
        return texture[top:top + h, left:left + w]
    image = patch(grass, size, size).copy()
    objects, taken = [], np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 4))):
        cat = int(rng.integers(2))
        side = int(rng.integers(size // 5, size // 3))
        top, left = (int(v) for v in rng.integers(0, size - side, 2))
        if taken[top:top + side, left:left + side].any():
            continue
        taken[top:top + side, left:left + side] = True
        if cat == 0:
            polygon = [left, top, left + side, top, left + side, top + side, left, top + side]
        else:
            angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
            r, c = side / 2, (left + side / 2, top + side / 2)
            polygon = np.stack([c[0] + r * np.cos(angles), c[1] + r * np.sin(angles)], 1).ravel().round(2).tolist()
        mask = Image.new('L', (size, size))
        ImageDraw.Draw(mask).polygon(polygon, fill=1)
        inside = np.array(mask, bool)
        image[inside] = patch(brick if cat == 0 else gravel, size, size)[inside]
        ys, xs = np.nonzero(inside)
        x0, y0 = int(xs.min()), int(ys.min())
        objects.append({'category_id': CATEGORIES[cat]['id'], 'segmentation': [polygon], 'iscrowd': 0,
                        'bbox': [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], 'area': int(inside.sum())})
    return np.repeat(image[..., None], 3, axis=2), objects


def write_coco(root: Path, count: int, size: int, seed: int) -> tuple[Path, Path]:
    """images/ + annotations.json under ``root``."""
    rng = np.random.default_rng(seed)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, objects = scene(rng, size)
        name = f'{i:03d}.jpg'
        Image.fromarray(image).save(root / 'images' / name, quality=95)
        images.append({'id': 100 + i, 'file_name': name, 'width': size, 'height': size})
        for obj in objects:
            annotations.append({'id': len(annotations) + 1, 'image_id': 100 + i, **obj})
    ann = root / 'annotations.json'
    ann.write_text(json.dumps({'images': images, 'annotations': annotations, 'categories': CATEGORIES}))
    return ann, root / 'images'
