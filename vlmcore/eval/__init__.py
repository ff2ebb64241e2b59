"""Evaluation in the field's own units, for any vlmcore model or exported run.

Generation, few-shot in-context learning and classification by log-likelihood:

- :mod:`vlmcore.eval.prompts`: OpenFlamingo's few-shot prompts and post-processing.
- :mod:`vlmcore.eval.demos`: the evaluated samples and random demonstrations of a trial.
- :mod:`vlmcore.eval.rices`: RICES, demonstrations by image similarity (features cached).
- :mod:`vlmcore.eval.generation`: one decoding interface over Flamingo, Frozen, BLIP-2 and BLIP.
- :mod:`vlmcore.eval.fewshot`: captioning / VQA evaluation over shots and trials, scored.
- :mod:`vlmcore.eval.classification`: class names ranked by log-likelihood; top-1, ROC AUC.
- :mod:`vlmcore.eval.run`: ``vlmcore-eval run``, evaluate-only from a run directory.

Nothing is imported here: each module is imported on its own (scoring needs pycocoevalcap and
Java, decoding does not).
"""
