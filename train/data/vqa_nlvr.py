"""The ``vqa`` and ``nlvr`` dataset kinds: what a shard sample holds and how it is read.

``kind: vqa``, one question per sample (``vlmcore-convert vqav2`` writes them from VQAv2's files):

- ``KEY.jpg`` (or .jpeg / .png / .webp): the image;
- ``KEY.json``: ``{"question": str, "answers": [str, ...], "weights": [float, ...]}``; without
  ``weights`` the answers are the annotators' raw list (VQAv2: 10) and each distinct answer weighs
  its share of the list (salesforce ``vqa_dataset``: ``1 / len(answers)`` per occurrence).
  ``question_id`` and the other VQAv2 fields may follow; ``KEY.txt`` (the question) is optional.

``kind: nlvr``, one sentence about two images per sample (``vlmcore-convert nlvr2``):

- ``KEY.left.png`` and ``KEY.right.png`` (or ``.jpg`` / ``.jpeg`` / ``.webp``): the two images;
- ``KEY.json``: ``{"sentence": str, "label": true | false}`` (``"True"`` / ``"False"``, 1 / 0 accepted).
"""

from __future__ import annotations

import json
from collections import Counter

from vlmcore.train.data.pipeline import IMAGE_EXTS, BadSample

VQA_KIND, NLVR_KIND = "vqa", "nlvr"


def _meta(sample: dict) -> dict:
    """``KEY.json`` as a dict; raises :class:`BadSample` (``json_error``) when missing or not an object."""
    if "__error__" in sample:
        raise BadSample(sample["__error__"], sample.get("__reason__", "unreadable_shard"))
    key = sample["__key__"]
    if "json" not in sample:
        raise BadSample(f"sample {key} has no {key}.json", "json_error")
    try:
        meta = json.loads(sample["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadSample(f"{key}.json is not JSON: {e}", "json_error") from None
    if not isinstance(meta, dict):
        raise BadSample(f"{key}.json is not an object", "json_error")
    return meta


def _image(sample: dict, prefix: str = "") -> bytes:
    """The bytes of ``KEY.<prefix>jpg`` (or jpeg / png / webp); raises :class:`BadSample` (``missing_image``)."""
    image = next((sample[prefix + e] for e in IMAGE_EXTS if prefix + e in sample), None)
    if image is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"sample {sample['__key__']} has no image member '{prefix}jpg' (or jpeg / png / webp; it "
                        f"has {members})", "missing_image")
    return image


def answer_weights(answers: list[str], weights: list | None = None) -> tuple[list[str], list[float]]:
    """Distinct answers and their weights: given ``weights`` as they are, else each distinct answer's
    share of the raw list (``["2", "2", "3", "2"]`` -> ``(["2", "3"], [0.75, 0.25])``)."""
    if weights is not None:
        return list(answers), [float(w) for w in weights]
    counts = Counter(answers)
    return list(counts), [count / len(answers) for count in counts.values()]


def vqa_fields(sample: dict) -> tuple[bytes, str, list[str], list[float]]:
    """``(image bytes, question, distinct answers, their weights)`` of a ``vqa`` sample; raises :class:`BadSample`."""
    meta, key = _meta(sample), sample["__key__"]
    question, answers, weights = meta.get("question"), meta.get("answers"), meta.get("weights")
    if not isinstance(question, str) or not question.strip():
        raise BadSample(f"{key}.json has no non-empty 'question' string", "json_error")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise BadSample(f"{key}.json: 'answers' must be a non-empty list of non-empty strings", "json_error")
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(answers) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)):
        raise BadSample(f"{key}.json: 'weights' must be a list of numbers >= 0, one per answer", "json_error")
    answers, weights = answer_weights([a.strip() for a in answers], weights)
    return _image(sample), question.strip(), answers, weights


def nlvr_fields(sample: dict) -> tuple[bytes, bytes, str, int]:
    """``(left image bytes, right image bytes, sentence, label 0 | 1)`` of an ``nlvr`` sample; raises
    :class:`BadSample`."""
    meta, key = _meta(sample), sample["__key__"]
    sentence, label = meta.get("sentence"), meta.get("label")
    if not isinstance(sentence, str) or not sentence.strip():
        raise BadSample(f"{key}.json has no non-empty 'sentence' string", "json_error")
    labels = {True: 1, False: 0, "True": 1, "False": 0, "true": 1, "false": 0}  # 1 == True, 0 == False
    if not isinstance(label, (bool, int, str)) or label not in labels:
        raise BadSample(f"{key}.json: 'label' must be true / false (or \"True\" / \"False\", 1 / 0), got {label!r}",
                        "json_error")
    return _image(sample, "left."), _image(sample, "right."), sentence.strip(), labels[label]
