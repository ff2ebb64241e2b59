"""The embedded dataset: procedurally drawn coloured shapes as WebDataset shards.

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

Output directory (``vlmcore-make-shapes --out DIR --n N``)::

    train-000000.tar ...   pairs: KEY.png, KEY.txt (caption), KEY.json (labels)
    eval-000000.tar ...    held-out pairs, caption "a <colour> <shape>"
    docs-000000.tar ...    MMC4-like documents: KEY.json {"text_list", "image_info"} + KEY.img<i>.png
    classes.json           {"classnames": [...], "templates": [...]} for zero-shot evaluation
    captions.txt           every caption / document text, one per line (tokenizer + LM pre-training)
    shapes.json            the generation parameters, written last (marks a complete dataset)

``--regions`` writes the region-feature variant instead (``regions-{train,eval}-*.tar`` with
``KEY.npz`` detector-style features, for ViLBERT / VL-BERT): see :mod:`vlmcore.train.data.regions`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import tarfile
import time

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
ZERO_SHOT_TEMPLATES = ["a {}", "a picture of a {}", "a {} on a background"]
TRAIN_BACKGROUNDS = {
    "white": (250, 250, 250), "gray": (205, 205, 205), "cream": (245, 238, 215),
    "mint": (215, 240, 225), "sky": (215, 228, 245), "lilac": (235, 222, 242),
}
GRID = 9  # position checkerboard: train centres in the even cells, held-out centres in the odd ones
EVAL_BACKGROUNDS = {"peach": (250, 222, 205), "silver": (225, 228, 232), "lemon": (245, 245, 200)}
# The colour always comes right after "a" and before the shape, so a captioning model that sees the
# image can name both; the size and background, when said, come after the shape.
_CAPTIONS = (
    "a {colour} {shape}",
    "a {colour} {shape}",
    "a {colour} {shape} on a {bg} background",
    "a {colour} {shape} that is {size}",
    "a picture of a {colour} {shape}",
    "{colour} {shape}",
)
_DOC_SENTENCES = (
    "here is a {colour} {shape} .",
    "next comes a {colour} {shape} that is {size} .",
    "this one shows a {colour} {shape} on a {bg} background .",
    "look at the {colour} {shape} .",
)
_DOC_FILLERS = ("the shapes are drawn by a program .", "every picture has one shape .", "that is the end .")


def _split_params(rng: random.Random, split: str) -> dict:
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
    """One RGB image ``[side, side]`` of ``colour`` ``shape`` drawn with the ``split``'s variations."""
    p = _split_params(rng, split)
    img = _background(rng, split, p["bg"], side)
    draw = ImageDraw.Draw(img)
    rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLOURS[colour])
    cx, cy, r = p["cx"] * side, p["cy"] * side, p["half"] * side
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        # Squares stay axis-aligned (a rotated square reads as a diamond); the others turn a little.
        angle = 0.0 if shape == "square" else rng.uniform(-0.35, 0.35)
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=rgb)
    return img, p


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ShardWriter:
    """Writes WebDataset shards ``<prefix>-000000.tar`` with at most ``shard_size`` samples each."""

    def __init__(self, out_dir: str, prefix: str, shard_size: int):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.count, self.tar, self.paths = 0, None, []

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self.count % self.shard_size == 0:
            self.close()
            path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):06d}.tar")
            self.paths.append(path)
            self.tar = tarfile.open(path + ".tmp", "w")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.paths[-1] + ".tmp", self.paths[-1])
            self.tar = None


def is_complete(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a finished shapes dataset (``shapes.json`` is written last)."""
    return os.path.isfile(os.path.join(out_dir, "shapes.json"))


def make_shapes(out_dir: str, n_train: int, n_eval: int = 480, n_docs: int = 1000, image_size: int = 64,
                shard_size: int = 1000, seed: int = 0) -> dict:
    """Generate the dataset into ``out_dir`` (see the module docstring); returns the summary written."""
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("n_docs", n_docs), ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    rng = random.Random(seed)
    texts = []
    classes = [(s, c) for s in SHAPES for c in COLOURS]

    def sample_class(i: int) -> tuple[str, str]:
        return classes[i % len(classes)] if i < len(classes) else rng.choice(classes)

    for split, n in (("train", n_train), ("eval", n_eval)):
        writer = ShardWriter(out_dir, split, shard_size)
        for i in range(n):
            shape, colour = classes[i % len(classes)] if split == "eval" else sample_class(i)
            img, p = draw_shape(rng, shape, colour, split, image_size)
            if split == "eval":
                caption = f"a {colour} {shape}"
            else:
                caption = rng.choice(_CAPTIONS).format(colour=colour, shape=shape, size=p["size"], bg=p["bg"])
                texts.append(caption)
            meta = {"shape": shape, "colour": colour, "label": CLASSNAMES.index(f"{colour} {shape}"),
                    "size": p["size"], "background": p["bg"]}
            writer.write(f"{split}{i:07d}", {"png": _png(img), "txt": caption.encode(),
                                              "json": json.dumps(meta).encode()})
        writer.close()
    writer = ShardWriter(out_dir, "docs", shard_size)
    for i in range(n_docs):
        n_img = rng.randint(1, 3)
        text_list, image_info, members = [], [], {}
        for j in range(n_img):
            shape, colour = rng.choice(classes)
            img, p = draw_shape(rng, shape, colour, "train", image_size)
            if j > 0 and rng.random() < 0.3:
                text_list.append(rng.choice(_DOC_FILLERS))
            image_info.append({"image_name": f"img{j}.png", "matched_text_index": len(text_list)})
            text_list.append(rng.choice(_DOC_SENTENCES).format(colour=colour, shape=shape, size=p["size"],
                                                               bg=p["bg"]))
            members[f"img{j}.png"] = _png(img)
        texts.append(" ".join(text_list))
        members["json"] = json.dumps({"text_list": text_list, "image_info": image_info}).encode()
        writer.write(f"doc{i:07d}", members)
    writer.close()
    with open(os.path.join(out_dir, "classes.json"), "w", encoding="utf-8") as f:
        json.dump({"classnames": CLASSNAMES, "templates": ZERO_SHOT_TEMPLATES}, f, indent=1)
    with open(os.path.join(out_dir, "captions.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(texts + [t.format(c) for c in CLASSNAMES for t in ZERO_SHOT_TEMPLATES]) + "\n")
    summary = {"n_train": n_train, "n_eval": n_eval, "n_docs": n_docs, "image_size": image_size,
               "shard_size": shard_size, "seed": seed, "classes": len(CLASSNAMES),
               "seconds": round(time.time() - start, 2)}
    with open(os.path.join(out_dir, "shapes.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(out_dir, "shapes.json.tmp"), os.path.join(out_dir, "shapes.json"))
    return summary


def console_main(argv: list[str] | None = None) -> None:
    """``vlmcore-make-shapes --out DIR --n N``: write the shapes dataset."""
    parser = argparse.ArgumentParser(prog="vlmcore-make-shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=4000, help="training image-text pairs")
    parser.add_argument("--n-eval", type=int, default=480, help="held-out pairs (other sizes/positions/backgrounds)")
    parser.add_argument("--n-docs", type=int, default=1000, help="interleaved documents (1-3 images each)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--regions", action="store_true",
                        help="write the region-feature variant (KEY.npz, for ViLBERT / VL-BERT) instead")
    parser.add_argument("--feature-dim", type=int, default=2048, help="--regions: region feature width")
    args = parser.parse_args(argv)
    if args.regions:
        from vlmcore.train.data.regions import make_region_shapes  # regions builds on this module

        summary = make_region_shapes(args.out, args.n, args.n_eval, args.image_size, args.feature_dim,
                                     shard_size=args.shard_size, seed=args.seed)
    else:
        summary = make_shapes(args.out, args.n, args.n_eval, args.n_docs, args.image_size, args.shard_size,
                              args.seed)
    print(json.dumps(summary))


if __name__ == "__main__":
    console_main()
