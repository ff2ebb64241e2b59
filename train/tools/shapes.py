"""The embedded dataset: procedurally drawn coloured shapes as WebDataset shards.

The classes, the drawing and the train / held-out variations are in
:mod:`vlmcore.train.tools.shape_drawing`. Output directory (``vlmcore-make-shapes --out DIR --n N``)::

    train-000000.tar ...   pairs: KEY.png, KEY.txt (caption), KEY.json (labels)
    eval-000000.tar ...    held-out pairs, caption "a <colour> <shape>"
    docs-000000.tar ...    MMC4-like documents: KEY.json {"text_list", "image_info"} + KEY.img<i>.png
    classes.json           {"classnames": [...], "templates": [...]} for zero-shot evaluation
    captions.txt           every caption / document text, one per line (tokenizer + LM pre-training)
    shapes.json            the generation parameters, written last (marks a complete dataset)

``--video`` writes moving-shapes clips instead (:mod:`vlmcore.train.tools.video_shapes`).
``--regions`` writes the region-feature variant instead (``regions-{train,eval}-*.tar`` with
``KEY.npz`` detector-style features, for ViLBERT / VL-BERT): see
:mod:`vlmcore.train.tools.region_shapes`.
"""

from __future__ import annotations

import json
import os
import random
import time

from vlmcore.train.data.tar_writer import ShardWriter
from vlmcore.train.tools.shape_drawing import (
    CLASSES,
    CLASSNAMES,
    ZERO_SHOT_TEMPLATES,
    class_index,
    draw_shape,
    pair_caption,
    pair_class,
    png_bytes,
    write_summary,
)

_DOC_SENTENCES = (
    "here is a {colour} {shape} .",
    "next comes a {colour} {shape} that is {size} .",
    "this one shows a {colour} {shape} on a {bg} background .",
    "look at the {colour} {shape} .",
)
_DOC_FILLERS = ("the shapes are drawn by a program .", "every picture has one shape .", "that is the end .")


def is_complete(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a finished shapes dataset (``shapes.json`` is written last)."""
    return os.path.isfile(os.path.join(out_dir, "shapes.json"))


def _check_sizes(n_train: int, n_eval: int, n_docs: int, image_size: int, shard_size: int) -> None:
    """Raise ValueError for a count below 1 or an image side below 16 pixels."""
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("n_docs", n_docs), ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")


def _write_pairs(out_dir: str, rng: random.Random, split: str, n: int, image_size: int, shard_size: int) -> list[str]:
    """Write ``<split>-*.tar`` (``KEY.png``, ``KEY.txt``, ``KEY.json``); returns the training captions
    (none for the held-out split, whose captions stay out of the tokenizer / LM text)."""
    texts = []
    writer = ShardWriter(out_dir, split, shard_size)
    for i in range(n):
        shape, colour = pair_class(rng, split, i)
        img, p = draw_shape(rng, shape, colour, split, image_size)
        caption = pair_caption(rng, shape, colour, split, p)
        if split != "eval":
            texts.append(caption)
        meta = {"shape": shape, "colour": colour, "label": class_index(shape, colour), "size": p["size"],
                "background": p["bg"]}
        writer.write(f"{split}{i:07d}", {"png": png_bytes(img), "txt": caption.encode(),
                                          "json": json.dumps(meta).encode()})
    writer.close()
    return texts


def _document(rng: random.Random, image_size: int) -> tuple[dict[str, bytes], str]:
    """One MMC4-like document of 1-3 training images: its members (``img<j>.png`` ..., ``json``) and its text."""
    text_list, image_info, members = [], [], {}
    for j in range(rng.randint(1, 3)):
        shape, colour = rng.choice(CLASSES)
        img, p = draw_shape(rng, shape, colour, "train", image_size)
        if j > 0 and rng.random() < 0.3:
            text_list.append(rng.choice(_DOC_FILLERS))
        image_info.append({"image_name": f"img{j}.png", "matched_text_index": len(text_list)})
        text_list.append(rng.choice(_DOC_SENTENCES).format(colour=colour, shape=shape, size=p["size"], bg=p["bg"]))
        members[f"img{j}.png"] = png_bytes(img)
    members["json"] = json.dumps({"text_list": text_list, "image_info": image_info}).encode()
    return members, " ".join(text_list)


def _write_docs(out_dir: str, rng: random.Random, n_docs: int, image_size: int, shard_size: int) -> list[str]:
    """Write ``docs-*.tar``; returns the documents' texts."""
    texts = []
    writer = ShardWriter(out_dir, "docs", shard_size)
    for i in range(n_docs):
        members, text = _document(rng, image_size)
        texts.append(text)
        writer.write(f"doc{i:07d}", members)
    writer.close()
    return texts


def _write_text_files(out_dir: str, texts: list[str]) -> None:
    """``classes.json`` (zero-shot class names and templates) and ``captions.txt`` (``texts`` + every prompt)."""
    with open(os.path.join(out_dir, "classes.json"), "w", encoding="utf-8") as f:
        json.dump({"classnames": CLASSNAMES, "templates": ZERO_SHOT_TEMPLATES}, f, indent=1)
    with open(os.path.join(out_dir, "captions.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(texts + [t.format(c) for c in CLASSNAMES for t in ZERO_SHOT_TEMPLATES]) + "\n")


def make_shapes(out_dir: str, n_train: int, n_eval: int = 480, n_docs: int = 1000, image_size: int = 64,
                shard_size: int = 1000, seed: int = 0) -> dict:
    """Generate the dataset into ``out_dir`` (see the module docstring); returns the summary written."""
    _check_sizes(n_train, n_eval, n_docs, image_size, shard_size)
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    rng = random.Random(seed)  # one stream, in this order: train pairs, eval pairs, documents
    texts = _write_pairs(out_dir, rng, "train", n_train, image_size, shard_size)
    _write_pairs(out_dir, rng, "eval", n_eval, image_size, shard_size)
    texts += _write_docs(out_dir, rng, n_docs, image_size, shard_size)
    _write_text_files(out_dir, texts)
    summary = {"n_train": n_train, "n_eval": n_eval, "n_docs": n_docs, "image_size": image_size,
               "shard_size": shard_size, "seed": seed, "classes": len(CLASSNAMES),
               "seconds": round(time.time() - start, 2)}
    write_summary(os.path.join(out_dir, "shapes.json"), summary)
    return summary
