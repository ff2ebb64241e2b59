"""vlmcore.eval: score models in the field's own units; the ``vlmcore-eval`` command (:mod:`vlmcore.eval.cli`).

- :mod:`vlmcore.eval.captions`: :func:`~vlmcore.eval.captions.score_captions`, COCOEvalCap's BLEU /
  METEOR / ROUGE-L / CIDEr (SPICE optional) with pycocoevalcap's own scorers.
- :mod:`vlmcore.eval.vqa`: :func:`~vlmcore.eval.vqa.vqa_accuracy` and
  :func:`~vlmcore.eval.vqa.normalize_answer`, the official VQA evaluation (tables in
  :mod:`vlmcore.eval.vqa_tables`), OK-VQA stemming behind a flag.
- :mod:`vlmcore.eval.zero_shot`: bundled ImageNet-1k class names, wnids, OpenAI's 80 templates and
  the short set (``zero_shot: imagenet`` of the clip / siglip tasks).
- :mod:`vlmcore.eval.linear_probe`: :func:`~vlmcore.eval.linear_probe.linear_probe`, logistic
  regression on frozen features with the regularization sweep, and its k-shot variant.
- :mod:`vlmcore.eval.prepare`: benchmark converters to WebDataset shards + ground-truth files.
- :mod:`vlmcore.eval.inputs`: JSON reading and :class:`~vlmcore.eval.inputs.EvalInputError`.

Generation, few-shot in-context learning and classification by log-likelihood:

- :mod:`vlmcore.eval.prompts`: OpenFlamingo's few-shot prompts and post-processing.
- :mod:`vlmcore.eval.demos`: the evaluated samples and random demonstrations of a trial.
- :mod:`vlmcore.eval.rices`: RICES, demonstrations by image similarity (features cached).
- :mod:`vlmcore.eval.generation`: one decoding interface over Flamingo, Frozen, BLIP-2 and BLIP.
- :mod:`vlmcore.eval.fewshot`: captioning / VQA evaluation over shots and trials, scored.
- :mod:`vlmcore.eval.classification`: class names ranked by log-likelihood; top-1, ROC AUC.
- :mod:`vlmcore.eval.run`: ``vlmcore-eval run``, evaluate-only from a run directory.

Optional dependencies (``pip install 'vlmcore[eval]'``): pycocoevalcap (+ Java) for captions,
scikit-learn for the probe; each is imported where it is used. This package never imports the
trainer (it sits in the models' layer). The reference is the repository's ``docs/evaluation.md``.
"""

from vlmcore.eval.captions import score_captions
from vlmcore.eval.linear_probe import linear_probe
from vlmcore.eval.vqa import normalize_answer, vqa_accuracy
from vlmcore.eval.zero_shot import imagenet_metadata, zero_shot_classes

__all__ = ["imagenet_metadata", "linear_probe", "normalize_answer", "score_captions", "vqa_accuracy",
           "zero_shot_classes"]
