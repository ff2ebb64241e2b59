"""What both shapes generators share: the classes, the drawing, the captions, the finishing summary.

:mod:`vlmcore.train.tools.shapes` (image-text pairs and documents) and
:mod:`vlmcore.train.tools.region_shapes` (detector-style region features) draw the same images
from the same random stream; neither imports the other.

:func:`moving_shape` draws the frames of a moving-shapes clip (:mod:`vlmcore.train.tools.video_shapes`).

24 classes = 4 shapes (circle, square, triangle, cross) x 6 colours. Each image varies in size,
position, rotation and background. The held-out ``eval`` split uses *other* values of all three:

==============  ==========================================  =====================================
                train (pairs and documents)                 eval (held out)
==============  ==========================================  =====================================
size            half-extent 14-23.5 % or 27.5-36 % of side  24-27 % of the side
position        centres in the "white" cells of a 9x9        centres in the "black" cells
                checkerboard (finer than any ViT patch grid)
background      6 light solid tints + pixel noise           3 other tints, vertical gradient
==============  ==========================================  =====================================
"""

from __future__ import annotations

import io
import json
import math
import os
import random

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 45, 175),
    "orange": (245, 135, 25),
}
CLASSNAMES = [f"{c} {s}" for s in SHAPES for c in COLOURS]
# (shape, colour) in CLASSNAMES order: the eval split and the first training images cycle through it.
CLASSES = [(s, c) for s in SHAPES for c in COLOURS]
ZERO_SHOT_TEMPLATES = ["a {}", "a picture of a {}", "a {} on a background"]
TRAIN_BACKGROUNDS = {
    "white": (250, 250, 250), "gray": (205, 205, 205), "cream": (245, 238, 215),
    "mint": (215, 240, 225), "sky": (215, 228, 245), "lilac": (235, 222, 242),
}
GRID = 9  # position checkerboard: train centres in the even cells, held-out centres in the odd ones
EVAL_BACKGROUNDS = {"peach": (250, 222, 205), "silver": (225, 228, 232), "lemon": (245, 245, 200)}
# The colour always comes right after "a" and before the shape, so a captioning model that sees the
# image can name both; the size and background, when said, come after the shape.
CAPTIONS = (
    "a {colour} {shape}",
    "a {colour} {shape}",
    "a {colour} {shape} on a {bg} background",
    "a {colour} {shape} that is {size}",
    "a picture of a {colour} {shape}",
    "{colour} {shape}",
)


# Motion of the moving-shapes clips (x, y steps; y grows downwards as in the image).
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def class_index(shape: str, colour: str) -> int:
    """The label of a ``colour`` ``shape``: its index in :data:`CLASSNAMES`."""
    return CLASSNAMES.index(f"{colour} {shape}")


def pair_class(rng: random.Random, split: str, i: int) -> tuple[str, str]:
    """``(shape, colour)`` of pair ``i``: the eval split and the first 24 training pairs cycle through the
    classes (every class is seen), later training pairs draw one at random."""
    if split == "eval" or i < len(CLASSES):
        return CLASSES[i % len(CLASSES)]
    return rng.choice(CLASSES)


def split_params(rng: random.Random, split: str) -> dict:
    """Size, centre and background of one image of ``split`` (fractions of the image side)."""
    if split == "eval":
        half = rng.uniform(0.24, 0.27)
        size_word = "medium"
        cells = [(i, j) for i in range(GRID) for j in range(GRID) if (i + j) % 2 == 1]
        bg_name = rng.choice(sorted(EVAL_BACKGROUNDS))
    else:
        small = rng.random() < 0.5
        half = rng.uniform(0.14, 0.235) if small else rng.uniform(0.275, 0.36)
        size_word = "small" if small else "large"
        cells = [(i, j) for i in range(GRID) for j in range(GRID) if (i + j) % 2 == 0]
        bg_name = rng.choice(sorted(TRAIN_BACKGROUNDS))
    ci, cj = rng.choice(cells)
    # The cell picks the centre region; the centre is kept so that the shape stays inside the image.
    lo, hi = half, 1.0 - half
    cx = lo + (hi - lo) * (ci + rng.random()) / GRID
    cy = lo + (hi - lo) * (cj + rng.random()) / GRID
    return {"half": half, "cx": cx, "cy": cy, "size": size_word, "bg": bg_name}


def _background(rng: random.Random, split: str, bg_name: str, side: int) -> Image.Image:
    """The ``[side, side]`` background: a vertical gradient (eval) or a noisy solid tint (train)."""
    if split == "eval":
        top = EVAL_BACKGROUNDS[bg_name]
        bottom = tuple(max(0, v - 30) for v in top)
        img = Image.new("RGB", (side, side))
        draw = ImageDraw.Draw(img)
        for y in range(side):
            t = y / max(1, side - 1)
            draw.line([(0, y), (side, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
        return img
    base = TRAIN_BACKGROUNDS[bg_name]
    noise = Image.effect_noise((side, side), 12).convert("RGB")
    return Image.blend(Image.new("RGB", (side, side), base), noise, 0.08)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Corners of a square / triangle / cross of radius ``r`` centred at (cx, cy), turned by ``angle``."""
    if shape == "square":
        pts = [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus sign with arms 0.5 r wide
        w = 0.25
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw_shape(rng: random.Random, shape: str, colour: str, split: str, side: int) -> tuple[Image.Image, dict]:
    """One RGB image ``[side, side]`` of ``colour`` ``shape`` drawn with the ``split``'s variations,
    and its :func:`split_params`."""
    p = split_params(rng, split)
    img = _background(rng, split, p["bg"], side)
    rgb = _jittered_colour(rng, colour)
    # Squares stay axis-aligned (a rotated square reads as a diamond); the others turn a little.
    angle = 0.0 if shape in ("circle", "square") else rng.uniform(-0.35, 0.35)
    _draw_at(img, shape, rgb, p["cx"] * side, p["cy"] * side, p["half"] * side, angle)
    return img, p


def _jittered_colour(rng: random.Random, colour: str) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLOURS[colour])


def _draw_at(img: Image.Image, shape: str, rgb: tuple, cx: float, cy: float, r: float, angle: float) -> None:
    """Draw ``shape`` of radius ``r`` (pixels) centred at (cx, cy), turned by ``angle``, onto ``img``."""
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=rgb)


def moving_shape(rng: random.Random, shape: str, colour: str, direction: str, split: str, side: int,
                 num_frames: int) -> list[Image.Image]:
    """``num_frames`` RGB frames ``[side, side]`` of ``colour`` ``shape`` moving in ``direction`` (one of
    :data:`DIRECTIONS`) at constant speed over the ``split``'s background (see :func:`split_params`).

    The path's centre is drawn independently of the direction, so the middle frame alone says nothing
    about the direction: only the order of the frames does.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {tuple(DIRECTIONS)}, got {direction!r}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 for a motion, got {num_frames}")
    p = split_params(rng, split)
    background = _background(rng, split, p["bg"], side)
    rgb = _jittered_colour(rng, colour)
    angle = 0.0 if shape in ("circle", "square") else rng.uniform(-0.35, 0.35)
    half, travel = rng.uniform(0.12, 0.16), rng.uniform(0.35, 0.45)  # radius, path length (fractions of the side)
    dx, dy = DIRECTIONS[direction]
    margin_x, margin_y = half + travel * abs(dx) / 2, half + travel * abs(dy) / 2  # the whole path stays inside
    cx, cy = rng.uniform(margin_x, 1 - margin_x), rng.uniform(margin_y, 1 - margin_y)
    frames = []
    for t in range(num_frames):
        step = travel * (t / (num_frames - 1) - 0.5)
        img = background.copy()
        _draw_at(img, shape, rgb, (cx + dx * step) * side, (cy + dy * step) * side, half * side, angle)
        frames.append(img)
    return frames


def pair_caption(rng: random.Random, shape: str, colour: str, split: str, params: dict) -> str:
    """The caption of a pair: ``"a <colour> <shape>"`` on the held-out split, else a random template."""
    if split == "eval":
        return f"a {colour} {shape}"
    return rng.choice(CAPTIONS).format(colour=colour, shape=shape, size=params["size"], bg=params["bg"])


def png_bytes(img: Image.Image) -> bytes:
    """``img`` as a PNG file (fast compression: the sets are regenerated, not archived)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_summary(path: str, summary: dict) -> None:
    """Write a generator's summary JSON atomically; written last, its presence marks a finished set."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)
