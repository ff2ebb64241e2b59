"""Region-feature samples for ViLBERT / VL-BERT: decoding ``KEY.npz`` and the shapes region variant.

A region sample in WebDataset shards is ``KEY.npz`` + ``KEY.txt`` (caption). The ``npz`` holds what
a detector (e.g. bottom-up attention's Faster R-CNN) wrote offline:

==================  ======================  ============================================
array               shape / dtype           meaning
==================  ======================  ============================================
``features``        ``[R, F]`` float16/32   pooled region features (F = 2048 for BUTD)
``boxes``           ``[R, 4]`` float        x1, y1, x2, y2 in pixels
``image_w/image_h`` scalars                 image size in pixels
``class_probs``     ``[R, C]`` float        the detector's class distribution per region
==================  ======================  ============================================

:func:`decode_regions` validates all of it (a bad or missing array is a :class:`BadSample`:
skipped and counted by the pipeline), normalizes boxes to ``[0, 1]`` with their area as the 5th
coordinate, keeps the first ``max_regions - 1`` regions and prepends ViLBERT's global region 0
(the mean feature, box = the whole image, class distribution = the mean).

:func:`make_region_shapes` (``vlmcore-make-shapes --regions``) writes such shards for the shapes
dataset with no detector: the boxes are known (the drawn object, jittered copies of it, background
boxes), a region's feature is a fixed random projection of its 8x8 pixel crop followed by a ReLU
(a stand-in for a detector's pooled features), and its class distribution is the share of the box
covered by the object (its class) vs background (class ``len(CLASSNAMES)``).
"""

from __future__ import annotations

import io
import json
import os
import random
import time

import numpy as np
import torch
from PIL import Image
from vlmcore.train.data.pipeline import BadSample
from vlmcore.train.data.tokenizer import train_word_tokenizer
from vlmcore.train.tools.shapes import _CAPTIONS, CLASSNAMES, COLOURS, SHAPES, ShardWriter, draw_shape

NUM_REGION_CLASSES = len(CLASSNAMES) + 1  # the shapes classes + background
BACKGROUND_CLASS = len(CLASSNAMES)
CROP_SIDE = 8
NPZ_ARRAYS = ("features", "boxes", "image_w", "image_h", "class_probs")


def decode_regions(data: bytes, *, max_regions: int, feature_dim: int, num_classes: int | None = None,
                   key: str = "?") -> dict[str, torch.Tensor]:
    """One ``KEY.npz`` -> ``features [R', F]`` fp32, ``boxes [R', 5]``, ``class_probs [R', C]`` with
    R' = min(R, max_regions - 1) + 1 (region 0 = the global image region). Raises :class:`BadSample`."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            missing = [name for name in NPZ_ARRAYS if name not in arrays.files]
            if missing:
                raise BadSample(f"sample {key}: npz has no array {', '.join(missing)} (needs {', '.join(NPZ_ARRAYS)})")
            features = np.asarray(arrays["features"], dtype=np.float32)
            boxes = np.asarray(arrays["boxes"], dtype=np.float64)
            width, height = float(arrays["image_w"]), float(arrays["image_h"])
            probs = np.asarray(arrays["class_probs"], dtype=np.float32)
    except BadSample:
        raise
    except Exception as error:  # numpy raises several types on corrupt archives
        raise BadSample(f"sample {key}: npz does not load: {type(error).__name__}: {error}") from None
    regions = features.shape[0] if features.ndim == 2 else -1
    if features.ndim != 2 or features.shape[1] != feature_dim:
        raise BadSample(f"sample {key}: features must be [R, {feature_dim}], got {list(features.shape)}")
    if regions < 1:
        raise BadSample(f"sample {key}: no region")
    if boxes.shape != (regions, 4):
        raise BadSample(f"sample {key}: boxes must be [{regions}, 4], got {list(boxes.shape)}")
    if probs.ndim != 2 or probs.shape[0] != regions or (num_classes is not None and probs.shape[1] != num_classes):
        raise BadSample(f"sample {key}: class_probs must be [{regions}, {num_classes or 'C'}], got {list(probs.shape)}")
    if not (width > 0 and height > 0):
        raise BadSample(f"sample {key}: image_w / image_h must be > 0, got {width} x {height}")
    if not (np.isfinite(features).all() and np.isfinite(boxes).all() and np.isfinite(probs).all()):
        raise BadSample(f"sample {key}: non-finite values in features, boxes or class_probs")
    scale = np.array([width, height, width, height])
    norm = boxes / scale
    if (norm < -1e-6).any() or (norm > 1 + 1e-6).any() or (norm[:, 2:] < norm[:, :2]).any():
        raise BadSample(f"sample {key}: boxes outside the {width:g} x {height:g} image or with x2 < x1 / y2 < y1")
    norm = norm.clip(0.0, 1.0)
    keep = min(regions, max_regions - 1)
    area = (norm[:keep, 2] - norm[:keep, 0]) * (norm[:keep, 3] - norm[:keep, 1])
    boxes5 = np.concatenate([norm[:keep], area[:, None]], axis=1)
    features, probs = features[:keep], probs[:keep]
    features = np.concatenate([features.mean(0, keepdims=True), features])
    boxes5 = np.concatenate([np.array([[0.0, 0.0, 1.0, 1.0, 1.0]]), boxes5])
    probs = np.concatenate([probs.mean(0, keepdims=True), probs])
    return {"region_features": torch.from_numpy(features), "region_boxes": torch.from_numpy(boxes5.astype(np.float32)),
            "class_probs": torch.from_numpy(probs)}


def pad_regions(sample: dict[str, torch.Tensor], max_regions: int) -> dict[str, torch.Tensor]:
    """Zero-pad :func:`decode_regions`' arrays to ``max_regions`` and add ``region_mask`` bool ``[max_regions]``."""
    regions = sample["region_features"].shape[0]
    out = {}
    for name, value in sample.items():
        padded = value.new_zeros((max_regions,) + tuple(value.shape[1:]))
        padded[:regions] = value
        out[name] = padded
    out["region_mask"] = torch.arange(max_regions) < regions
    return out


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
    """The object box, then ``extra`` boxes: jittered copies of the object (half) and background boxes."""
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


def make_region_shapes(out_dir: str, n_train: int, n_eval: int = 240, image_size: int = 64, feature_dim: int = 2048,
                       regions_per_image: tuple[int, int] = (4, 9), shard_size: int = 1000, seed: int = 0) -> dict:
    """Write ``regions-train-*.tar`` / ``regions-eval-*.tar`` (``KEY.npz``, ``KEY.txt``, ``KEY.json``)
    into ``out_dir``: the shapes images (train / held-out variations, see :mod:`vlmcore.train.tools.shapes`)
    as detector-style region features, plus ``captions.txt`` and a word-level ``tokenizer.json``
    trained on it. Returns the summary also written to ``regions.json`` (last,
    so its presence marks a complete set)."""
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("feature_dim", feature_dim),
                    ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    low, high = regions_per_image
    if not 1 <= low <= high:
        raise ValueError(f"regions_per_image must be (low, high) with 1 <= low <= high, got {regions_per_image}")
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    rng = random.Random(seed)
    project = CropProjector(feature_dim, seed=seed + 1234)
    classes = [(s, c) for s in SHAPES for c in COLOURS]
    captions = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        writer = ShardWriter(out_dir, f"regions-{split}", shard_size)
        for i in range(n):
            shape, colour = classes[i % len(classes)] if split == "eval" or i < len(classes) else rng.choice(classes)
            img, p = draw_shape(rng, shape, colour, split, image_size)
            half = p["half"] * image_size
            cx, cy = p["cx"] * image_size, p["cy"] * image_size
            obj = np.clip(np.array([cx - half, cy - half, cx + half, cy + half]), 0, image_size)
            boxes = _region_boxes(rng, obj, image_size, rng.randint(low, high) - 1)
            label = CLASSNAMES.index(f"{colour} {shape}")
            probs = np.full((len(boxes), NUM_REGION_CLASSES), 0.01 / NUM_REGION_CLASSES, dtype=np.float32)
            for r, box in enumerate(boxes):
                covered = min(1.0, _coverage(box, obj) / 0.7)  # the drawn shape fills ~70% of its box
                probs[r, label] += 0.99 * covered
                probs[r, BACKGROUND_CLASS] += 0.99 * (1 - covered)
            features = np.stack([project(img, tuple(box)) for box in boxes])
            if split == "eval":
                caption = f"a {colour} {shape}"
            else:
                caption = rng.choice(_CAPTIONS).format(colour=colour, shape=shape, size=p["size"], bg=p["bg"])
            captions.append(caption)
            meta = {"shape": shape, "colour": colour, "label": label}
            writer.write(f"{split}{i:07d}", {"npz": npz_bytes(features, boxes, image_size, image_size, probs),
                                              "txt": caption.encode(), "json": json.dumps(meta).encode()})
        writer.close()
    with open(os.path.join(out_dir, "captions.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(captions) + "\n")
    train_word_tokenizer(os.path.join(out_dir, "captions.txt"), os.path.join(out_dir, "tokenizer.json"))
    summary = {"n_train": n_train, "n_eval": n_eval, "image_size": image_size, "feature_dim": feature_dim,
               "num_classes": NUM_REGION_CLASSES, "regions_per_image": [low, high], "seed": seed,
               "seconds": round(time.time() - start, 2)}
    with open(os.path.join(out_dir, "regions.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(out_dir, "regions.json.tmp"), os.path.join(out_dir, "regions.json"))
    return summary


def regions_complete(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a finished region set (``regions.json`` is written last)."""
    return os.path.isfile(os.path.join(out_dir, "regions.json"))
