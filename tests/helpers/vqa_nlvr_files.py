"""Tiny VQAv2- and NLVR2-format source files (coloured squares on black) for ``vlmcore-convert``: the
questions ask for the square's colour; the NLVR2 sentences name the left square's colour."""

from __future__ import annotations

import io
import json
import pathlib

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def square(colour: str, fmt: str) -> bytes:
    """A 32 x 32 image: a 16 x 16 square of ``colour`` in the middle, encoded as ``fmt`` (JPEG, PNG)."""
    out = io.BytesIO()
    image = Image.new("RGB", (32, 32))
    image.paste(COLOURS[colour], (8, 8, 24, 24))
    image.save(out, format=fmt)
    return out.getvalue()


def write_vqav2(root: pathlib.Path, n: int = 24) -> pathlib.Path:
    """VQAv2's layout in ``root``: q.json (questions), a.json (annotations: 8 annotators say the square's
    colour, 2 the next colour), images/COCO_train2014_<id>.jpg. Returns ``root``."""
    (root / "images").mkdir()
    names = list(COLOURS)
    questions, annotations = [], []
    for i in range(n):
        colour = names[i % 3]
        (root / "images" / f"COCO_train2014_{i:012d}.jpg").write_bytes(square(colour, "JPEG"))
        questions.append({"question_id": 100 + i, "image_id": i, "question": "what colour is the square"})
        human = [colour] * 8 + [names[(i + 1) % 3]] * 2
        annotations.append({"question_id": 100 + i, "answers": [{"answer": a} for a in human],
                            "question_type": "what color", "answer_type": "other"})
    (root / "q.json").write_text(json.dumps({"data_subtype": "train2014", "questions": questions}))
    (root / "a.json").write_text(json.dumps({"annotations": annotations}))
    return root


def write_nlvr2(root: pathlib.Path, n: int = 24) -> pathlib.Path:
    """NLVR2's layout in ``root``: dev.json (jsonl: identifier, sentence, label), images/<id>-img0.png and
    -img1.png. Returns ``root``."""
    (root / "images").mkdir()
    names, rows = list(COLOURS), []
    for i in range(n):
        left, right = names[i % 3], names[(i // 3) % 3]
        (root / "images" / f"dev-{i}-0-img0.png").write_bytes(square(left, "PNG"))
        (root / "images" / f"dev-{i}-0-img1.png").write_bytes(square(right, "PNG"))
        rows.append({"identifier": f"dev-{i}-0-1", "sentence": f"the left square is {left}",
                     "label": "True" if i % 2 else "False"})
    (root / "dev.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root
