"""Caption metrics with COCOEvalCap's own code: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE on request).

:func:`score_captions` runs exactly what ``pycocoevalcap.eval.COCOEvalCap.evaluate`` runs, without
its ``pycocotools`` detour: the PTB tokenizer (Java) over references and predictions, then the
``Bleu(4)``, ``Meteor``, ``Rouge`` and ``Cider`` scorers on the images that have a prediction
(``coco_eval.params["image_id"] = coco_result.getImgIds()``, as OpenFlamingo and LAVIS call it).
The key names are COCOEvalCap's. SPICE is off by default: its scorer downloads Stanford CoreNLP on
first use, so when its jars are absent this refuses with a message instead of reaching the network.
"""

from __future__ import annotations

import os

from vlmcore.eval.inputs import EvalInputError, MissingToolError, require_keys, require_list

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def _pycocoevalcap():
    """The ``pycocoevalcap`` package, or a MissingToolError telling how to install it."""
    try:
        import pycocoevalcap
    except ImportError as e:
        raise MissingToolError("caption scoring needs pycocoevalcap (and Java): pip install 'vlmcore[eval]'") from e
    return pycocoevalcap


def _references_by_image(references: dict) -> dict[int, list[str]]:
    """COCO captions annotation dict -> ``{image_id: [caption, ...]}`` in the order of ``images``."""
    require_keys(references, ("images", "annotations"), "references", "the top-level object")
    images = require_list(references["images"], "references", "images")
    by_image: dict[int, list[str]] = {}
    for i, image in enumerate(images):
        by_image[require_keys(image, ("id",), "references", f"images[{i}]")["id"]] = []
    for i, ann in enumerate(require_list(references["annotations"], "references", "annotations")):
        require_keys(ann, ("image_id", "caption"), "references", f"annotations[{i}]")
        if ann["image_id"] not in by_image:
            raise EvalInputError("references", f"annotations[{i}]: image_id {ann['image_id']!r} is not in 'images'")
        by_image[ann["image_id"]].append(str(ann["caption"]))
    return by_image


def _predictions_by_image(predictions: list[dict], references: dict[int, list[str]]) -> dict[int, str]:
    """COCO results list -> ``{image_id: caption}``; unknown, duplicate or unreferenced ids are errors."""
    out: dict[int, str] = {}
    for i, pred in enumerate(require_list(predictions, "predictions", "predictions")):
        require_keys(pred, ("image_id", "caption"), "predictions", f"entry {i}")
        image_id = pred["image_id"]
        if image_id not in references:
            raise EvalInputError("predictions", f"entry {i}: image_id {image_id!r} is not in the references")
        if not references[image_id]:
            raise EvalInputError("references", f"image {image_id!r} (predicted in entry {i}) has no caption")
        if image_id in out:
            raise EvalInputError("predictions", f"entry {i}: a second caption for image_id {image_id!r}")
        if not isinstance(pred["caption"], str):
            raise EvalInputError("predictions", f"entry {i} (image_id {image_id!r}): 'caption' is not a string")
        out[image_id] = pred["caption"]
    return out


def _spice_scorer():
    """pycocoevalcap's SPICE scorer when its Stanford CoreNLP jars are installed, else a MissingToolError."""
    spice_dir = os.path.join(os.path.dirname(_pycocoevalcap().__file__), "spice")
    jar = os.path.join(spice_dir, "lib", "stanford-corenlp-3.6.0.jar")
    if not os.path.isfile(jar):
        raise MissingToolError(
            f"SPICE needs Stanford CoreNLP 3.6.0 ({jar} and stanford-corenlp-3.6.0-models.jar beside it), which "
            "pycocoevalcap downloads on first use; vlmcore never downloads: put the two jars there "
            "(python -m pycocoevalcap.spice.get_stanford_models on a machine with network access) or drop --spice")
    from pycocoevalcap.spice.spice import Spice

    return Spice()


def score_captions(predictions: list[dict], references: dict, *, spice: bool = False) -> dict:
    """COCOEvalCap's metrics of ``predictions`` against ``references``.

    Args:
        predictions: COCO results, ``[{"image_id": id, "caption": str}, ...]``, one per image.
        references: a COCO captions annotation dict, ``{"images": [{"id"}], "annotations":
            [{"image_id", "caption"}]}``; images without a prediction are left out of the scores.
        spice: also run SPICE (needs the Stanford CoreNLP jars, see the module docstring).

    Returns:
        ``{"Bleu_1", ..., "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]}`` as floats (COCOEvalCap's
        scale: CIDEr 1.0 = 100 in papers) and ``"images"``, the number of images scored.
    """
    _pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    by_image = _references_by_image(references)
    predicted = _predictions_by_image(predictions, by_image)
    spice_scorer = _spice_scorer() if spice else None  # refuse before the slow Java steps
    image_ids = [i for i in by_image if i in predicted]  # COCOEvalCap's order: that of the references' images
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in by_image[i]] for i in image_ids})
    res = tokenizer.tokenize({i: [{"caption": predicted[i]}] for i in image_ids})
    scorers = [(Bleu(4), CAPTION_METRICS[:4]), (Meteor(), ("METEOR",)), (Rouge(), ("ROUGE_L",)), (Cider(), ("CIDEr",))]
    if spice_scorer is not None:
        scorers.append((spice_scorer, ("SPICE",)))
    results: dict = {}
    for scorer, names in scorers:
        score, _ = scorer.compute_score(gts, res)
        values = score if isinstance(score, list) else [score]
        results.update({name: float(value) for name, value in zip(names, values)})
    results["images"] = len(image_ids)
    return results
