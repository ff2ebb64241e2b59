"""Image preprocessing with PIL and torch only (no torchvision): OpenCLIP's train / eval transforms.

- train (``train="random_resized_crop"``): torchvision's ``RandomResizedCrop`` algorithm (area fraction
  in ``scale``, OpenCLIP's default (0.9, 1.0); log-uniform aspect ratio in ``ratio``; 10 tries, then
  a center crop of clamped ratio), resized to ``size`` x ``size``.
- eval (and train with ``train="resize"``): ``resize_mode="shortest"``: the shorter side resized to
  ``size / crop_pct`` (OpenCLIP: crop_pct 1; timm: its ``crop_pct``), then a center crop of ``size``;
  ``"squash"``: resized to ``size`` x ``size`` ignoring the aspect ratio.
- then ``[0, 1]`` scaling and ``(x - mean) / std`` per channel.

Resizing is PIL's (antialiased; ``interpolation`` bicubic by default, as OpenCLIP and OpenAI), the
same library torchvision uses on PIL images. Random crops draw from a ``random.Random`` seeded by
the caller per sample (the data pipeline uses seed + shard URL + sample key), so decoding stays on
the data workers and a resumed run crops exactly as the uninterrupted one.

:func:`tower_preprocess` reads the defaults (size, mean, std, interpolation, crop_pct) from a tower:
open_clip's ``visual.preprocess_cfg``, timm's ``pretrained_cfg``, or an HF directory's
``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS}
# transformers' `resample` ints are PIL's.
_PIL_TO_NAME = {int(v): k for k, v in INTERPOLATIONS.items()}
TRAIN_MODES = ("random_resized_crop", "resize")
RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalized float tensor ``[3, size, size]`` (see the module docstring).

    ``__call__(image, rng=None)``: ``rng`` (a ``random.Random``) is required for the random crop of a
    training transform and ignored otherwise.
    """

    size: int
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    is_train: bool = False
    train: str = "random_resized_crop"
    scale: tuple = (0.9, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    crop_pct: float = 1.0

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                raise ValueError(f"{name} must be 3 numbers (R, G, B), got {value!r}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {self.train!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {self.scale!r}")
        if not (len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {self.ratio!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box ``(left, top, crop_width, crop_height)`` for a ``width x height`` image."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, width - w), rng.randint(0, height - h), w, h
        in_ratio = width / height  # fallback: a center crop of the clamped aspect ratio
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """The eval geometry: shortest side to ``size / crop_pct`` then a center crop, or a squash."""
        resample = INTERPOLATIONS[self.interpolation]
        if self.resize_mode == "squash":
            return image.resize((self.size, self.size), resample)
        width, height = image.size
        short_target = int(math.floor(self.size / self.crop_pct + 1e-6))  # 16 / (16 / 18) is 18, not 17
        if width <= height:
            new_w, new_h = short_target, int(short_target * height / width)
        else:
            new_w, new_h = int(short_target * width / height), short_target
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample)
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        if self.is_train and self.train == "random_resized_crop":
            if rng is None:
                raise ValueError("a training transform with random_resized_crop needs rng (a random.Random)")
            left, top, w, h = self.crop_box(*image.size, rng)
            image = image.resize((self.size, self.size), INTERPOLATIONS[self.interpolation],
                                 box=(left, top, left + w, top + h))
        else:
            image = self.resize_and_crop(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels - mean) / std

    def for_eval(self) -> ImageTransform:
        return ImageTransform(**{**self.__dict__, "is_train": False})


def _size_of(value) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and value:
        return int(value[-1])  # (C, H, W) or (H, W): square towers here
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in value:
                return int(value[key])
    return None


def tower_preprocess(kind: str, tower=None, path: str = "") -> dict:
    """The preprocessing a tower was trained with: ``{size, mean, std, interpolation, crop_pct,
    resize_mode}`` (only the keys the tower declares).

    ``kind``: ``open_clip`` (``tower`` = the open_clip model or its ``visual``: ``preprocess_cfg``),
    ``timm`` (``tower`` = the timm model, or its ``pretrained_cfg`` dict), ``hf`` (``path`` = the model directory:
    ``preprocessor_config.json``, if present), ``builtin`` (OpenAI CLIP's mean / std).
    """
    if kind == "builtin":
        return {"mean": OPENAI_MEAN, "std": OPENAI_STD}
    if kind == "open_clip":
        visual = getattr(tower, "visual", tower)
        cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
        out = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
        if _size_of(cfg.get("size")):
            out["size"] = _size_of(cfg["size"])
        if out.get("resize_mode") not in (None, *RESIZE_MODES):
            raise ValueError(f"open_clip resize_mode {out['resize_mode']!r} is not supported here "
                             f"(supported: {RESIZE_MODES}); set data.preprocess.resize_mode")
        return out
    if kind == "timm":
        cfg = tower if isinstance(tower, dict) else getattr(tower, "pretrained_cfg", None) or {}
        out = {k: cfg[k] for k in ("mean", "std", "interpolation", "crop_pct") if cfg.get(k) is not None}
        if _size_of(cfg.get("input_size")):
            out["size"] = _size_of(cfg["input_size"])
        if out.get("interpolation") not in (None, *INTERPOLATIONS):
            out.pop("interpolation")  # e.g. timm's "random": keep our default
        return out
    if kind == "hf":
        config_file = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(config_file):
            return {}
        with open(config_file, encoding="utf-8") as f:
            cfg = json.load(f)
        out = {}
        if "image_mean" in cfg:
            out["mean"] = cfg["image_mean"]
        if "image_std" in cfg:
            out["std"] = cfg["image_std"]
        if "resample" in cfg and int(cfg["resample"]) in _PIL_TO_NAME:
            out["interpolation"] = _PIL_TO_NAME[int(cfg["resample"])]
        crop = _size_of(cfg.get("crop_size")) if cfg.get("do_center_crop", True) else None
        size = _size_of(cfg.get("size"))
        if crop:
            out["size"] = crop
            if size and size > crop:
                out["crop_pct"] = crop / size
        elif size:
            out.update(size=size, resize_mode="squash" if isinstance(cfg.get("size"), dict)
                       and "height" in cfg["size"] else "shortest")
        return out
    raise ValueError(f"kind must be one of open_clip, timm, hf, builtin, got {kind!r}")


def build_transforms(size: int, tower_cfg: dict, options: dict) -> tuple[ImageTransform, ImageTransform]:
    """(train, eval) transforms: ``options`` (the config's ``data.preprocess``; None values unset)
    over the tower's own values over the defaults. ``size`` is the tower's actual input size; it wins
    over a size the tower's config declares (a timm model built with ``img_size=32`` keeps a 224
    ``pretrained_cfg``)."""
    merged = {k: v for k, v in tower_cfg.items() if k != "size"}
    merged.update({k: v for k, v in options.items() if v is not None})
    for key in ("mean", "std", "scale", "ratio"):
        if key in merged:
            merged[key] = tuple(float(v) for v in merged[key])
    train = ImageTransform(size=size, is_train=True, **merged)
    return train, train.for_eval()
