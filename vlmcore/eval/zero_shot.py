"""ImageNet-1k zero-shot metadata shipped with vlmcore: class names, wnids and prompt templates.

``imagenet.json`` (package data) holds the 1000 ILSVRC-2012 wnids in class-index order (sorted, the
order of every ImageNet folder loader), the class names OpenAI wrote for CLIP's zero-shot notebook
(the list open_clip ships), OpenAI's 80 prompt templates and the 7-template short set. With them a
CLIP / SigLIP task evaluates ``zero_shot: imagenet`` without a user file.
"""

from __future__ import annotations

import functools
import json
import os

#: The bundled class sets: name -> which template list goes with the ImageNet class names.
ZERO_SHOT_SETS = {"imagenet": "templates", "imagenet_simple": "simple_templates"}


@functools.cache
def imagenet_metadata() -> dict:
    """``{"wnids": [1000], "classnames": [1000], "templates": [80], "simple_templates": [7]}``;
    templates are format strings with one ``{}`` for the class name."""
    with open(os.path.join(os.path.dirname(__file__), "imagenet.json"), encoding="utf-8") as f:
        data = json.load(f)
    return {key: data[key] for key in ("wnids", "classnames", "templates", "simple_templates")}


def zero_shot_classes(name: str) -> dict:
    """A bundled class set as the CLIP task's classes file holds one: ``{"classnames", "templates"}``.

    ``name``: ``imagenet`` (OpenAI's 80 templates) or ``imagenet_simple`` (the 7 short ones).
    """
    if name not in ZERO_SHOT_SETS:
        raise ValueError(f"unknown zero-shot class set {name!r}; bundled: {sorted(ZERO_SHOT_SETS)}")
    meta = imagenet_metadata()
    return {"classnames": list(meta["classnames"]), "templates": list(meta[ZERO_SHOT_SETS[name]])}
