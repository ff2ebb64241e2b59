"""The shapes dataset as detector-style region features (``vlmcore-make-shapes --regions``), for
ViLBERT / VL-BERT.

No detector runs: the boxes are known (the drawn object, jittered copies of it, background boxes),
a region's feature is a fixed random projection of its 8x8 pixel crop followed by a ReLU (a
stand-in for a detector's pooled features), and its class distribution is the share of the box
covered by the object (its class) vs background (class ``len(CLASSNAMES)``). The samples follow
the ``KEY.npz`` layout that :mod:`vlmcore.train.data.regions` decodes; the images are the shapes
images (train / held-out variations, see :mod:`vlmcore.train.tools.shape_drawing`).
"""

from __future__ import annotations

import io
import json
import os
import random
import time

import numpy as np
from PIL import Image
from vlmcore.train.data.tar_writer import ShardWriter
from vlmcore.train.data.tokenizer import train_word_tokenizer
from vlmcore.train.tools.shape_drawing import (
    CLASSNAMES,
    class_index,
    draw_shape,
    pair_caption,
    pair_class,
    write_summary,
)

NUM_REGION_CLASSES = len(CLASSNAMES) + 1  # the shapes classes + background
BACKGROUND_CLASS = len(CLASSNAMES)
CROP_SIDE = 8
OBJECT_FILL = 0.7  # the drawn shape covers ~70% of its box: a box that covers this much is all object


def npz_bytes(features: np.ndarray, boxes: np.ndarray, image_w: int, image_h: int, class_probs: np.ndarray) -> bytes:
    """The ``KEY.npz`` member for one image (features stored as float16, as detectors' dumps are)."""
    buf = io.BytesIO()
    np.savez(buf, features=features.astype(np.float16), boxes=boxes.astype(np.float32), image_w=np.int32(image_w),
             image_h=np.int32(image_h), class_probs=class_probs.astype(np.float32))
    return buf.getvalue()


class CropProjector:
    """The stand-in detector head: an RGB crop resized to 8x8, flattened, times a fixed Gaussian matrix, ReLU."""

    def __init__(self, feature_dim: int, seed: int = 1234):
        self.weight = np.random.default_rng(seed).standard_normal((3 * CROP_SIDE * CROP_SIDE, feature_dim)).astype(
            np.float32) / np.sqrt(3 * CROP_SIDE * CROP_SIDE)

    def __call__(self, image: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
        """The ``[feature_dim]`` feature of the region ``box`` (x1, y1, x2, y2 pixels) of ``image``."""
        crop = image.crop(tuple(int(round(v)) for v in box)).resize((CROP_SIDE, CROP_SIDE), Image.BILINEAR)
        pixels = np.asarray(crop, dtype=np.float32).reshape(-1) / 255.0 - 0.5
        return np.maximum(pixels @ self.weight, 0.0)


def _coverage(box: np.ndarray, obj: np.ndarray) -> float:
    """Share of ``box`` covered by ``obj`` (both x1, y1, x2, y2)."""
    ix = max(0.0, min(box[2], obj[2]) - max(box[0], obj[0]))
    iy = max(0.0, min(box[3], obj[3]) - max(box[1], obj[1]))
    area = max(1e-9, (box[2] - box[0]) * (box[3] - box[1]))
    return ix * iy / area


def _region_boxes(rng: random.Random, obj: np.ndarray, side: int, extra: int) -> np.ndarray:
    """``[1 + extra, 4]``: the object box, then ``extra`` boxes: jittered copies of the object (half) and
    background boxes."""
    boxes = [obj]
    w, h = obj[2] - obj[0], obj[3] - obj[1]
    for i in range(extra):
        if i % 2 == 0:
            dx, dy = rng.uniform(-0.4, 0.4) * w, rng.uniform(-0.4, 0.4) * h
            s = rng.uniform(0.7, 1.3)
            cx, cy = (obj[0] + obj[2]) / 2 + dx, (obj[1] + obj[3]) / 2 + dy
            box = [cx - s * w / 2, cy - s * h / 2, cx + s * w / 2, cy + s * h / 2]
        else:
            bw, bh = rng.uniform(0.15, 0.4) * side, rng.uniform(0.15, 0.4) * side
            x, y = rng.uniform(0, side - bw), rng.uniform(0, side - bh)
            box = [x, y, x + bw, y + bh]
        box = np.clip(np.array(box), 0, side)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            box = obj.copy()
        boxes.append(box)
    return np.stack(boxes)


def _class_probs(boxes: np.ndarray, obj: np.ndarray, label: int) -> np.ndarray:
    """``[R, NUM_REGION_CLASSES]``: per box, the object's class in proportion to how much of the box it
    covers, the rest background, over a 1% uniform floor."""
    probs = np.full((len(boxes), NUM_REGION_CLASSES), 0.01 / NUM_REGION_CLASSES, dtype=np.float32)
    for r, box in enumerate(boxes):
        covered = min(1.0, _coverage(box, obj) / OBJECT_FILL)
        probs[r, label] += 0.99 * covered
        probs[r, BACKGROUND_CLASS] += 0.99 * (1 - covered)
    return probs


def _region_sample(rng: random.Random, project: CropProjector, split: str, i: int, image_size: int,
                   regions_per_image: tuple[int, int]) -> tuple[dict[str, bytes], str]:
    """Sample ``i`` of ``split``: its members (``npz``, ``txt``, ``json``) and its caption."""
    shape, colour = pair_class(rng, split, i)
    img, p = draw_shape(rng, shape, colour, split, image_size)
    half = p["half"] * image_size
    cx, cy = p["cx"] * image_size, p["cy"] * image_size
    obj = np.clip(np.array([cx - half, cy - half, cx + half, cy + half]), 0, image_size)
    boxes = _region_boxes(rng, obj, image_size, rng.randint(*regions_per_image) - 1)
    label = class_index(shape, colour)
    probs = _class_probs(boxes, obj, label)
    features = np.stack([project(img, tuple(box)) for box in boxes])
    caption = pair_caption(rng, shape, colour, split, p)
    meta = {"shape": shape, "colour": colour, "label": label}
    members = {"npz": npz_bytes(features, boxes, image_size, image_size, probs), "txt": caption.encode(),
               "json": json.dumps(meta).encode()}
    return members, caption


def _check_settings(n_train: int, n_eval: int, feature_dim: int, shard_size: int,
                    regions_per_image: tuple[int, int]) -> None:
    """Raise ValueError for a count below 1 or a bad ``(low, high)`` region range."""
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("feature_dim", feature_dim),
                    ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    low, high = regions_per_image
    if not 1 <= low <= high:
        raise ValueError(f"regions_per_image must be (low, high) with 1 <= low <= high, got {regions_per_image}")


def make_region_shapes(out_dir: str, n_train: int, n_eval: int = 240, image_size: int = 64, feature_dim: int = 2048,
                       regions_per_image: tuple[int, int] = (4, 9), shard_size: int = 1000, seed: int = 0) -> dict:
    """Write ``regions-train-*.tar`` / ``regions-eval-*.tar`` (``KEY.npz``, ``KEY.txt``, ``KEY.json``)
    into ``out_dir`` (see the module docstring), plus ``captions.txt`` and a word-level
    ``tokenizer.json`` trained on it. Returns the summary also written to ``regions.json`` (last,
    so its presence marks a complete set)."""
    _check_settings(n_train, n_eval, feature_dim, shard_size, regions_per_image)
    low, high = regions_per_image
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    rng = random.Random(seed)
    project = CropProjector(feature_dim, seed=seed + 1234)
    captions = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        writer = ShardWriter(out_dir, f"regions-{split}", shard_size)
        for i in range(n):
            members, caption = _region_sample(rng, project, split, i, image_size, (low, high))
            captions.append(caption)
            writer.write(f"{split}{i:07d}", members)
        writer.close()
    with open(os.path.join(out_dir, "captions.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(captions) + "\n")
    train_word_tokenizer(os.path.join(out_dir, "captions.txt"), os.path.join(out_dir, "tokenizer.json"))
    summary = {"n_train": n_train, "n_eval": n_eval, "image_size": image_size, "feature_dim": feature_dim,
               "num_classes": NUM_REGION_CLASSES, "regions_per_image": [low, high], "seed": seed,
               "seconds": round(time.time() - start, 2)}
    write_summary(os.path.join(out_dir, "regions.json"), summary)
    return summary


def regions_complete(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a finished region set (``regions.json`` is written last)."""
    return os.path.isfile(os.path.join(out_dir, "regions.json"))
