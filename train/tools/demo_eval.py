"""The demo's generation step: what the trained Flamingo writes, scored in the field's units.

On the held-out shapes images (another size, position and background than training), with the
demonstrations drawn from the training pairs (OpenFlamingo's random-demo protocol, one trial):

- captioning CIDEr (and BLEU-4, METEOR, ROUGE-L), 0-shot and 4-shot;
- a shapes VQA set, "What colour is the shape? Short answer: red", accuracy 0-shot and 4-shot;
- both next to the *blind* baseline: the same prompts with every image blanked (zeros), i.e. what the
  frozen LM guesses from the text alone.

The prompts use the trainer's layout (``data.eval.generation.prompt_style: trainer``): the demo's
word-level tokenizer would read OpenFlamingo's ``Output:a`` as one unknown word. Nothing here is
tuned to make 4-shot beat 0-shot; the numbers are what they are (see docs/evaluation_generation.md).
"""

from __future__ import annotations

import json
import os

import torch

from vlmcore.eval import fewshot
from vlmcore.eval.prompts import TRAINER
from vlmcore.eval.run import load_run

QUESTION = "What colour is the shape?"
NUM_SAMPLES = 120  # held-out images scored (of 480), to keep the step at a few CPU minutes


def colour_questions(samples: list[dict]) -> list[dict]:
    """VQA samples asking the colour of each shapes image (answer: its ``KEY.json`` colour)."""
    return [{"id": s["id"], "image": s["image"], "question": QUESTION, "answers": [s["meta"]["colour"]]}
            for s in samples]


def blinded(samples: list[dict]) -> list[dict]:
    """The same samples with their images replaced by zeros (the blind baseline)."""
    return [{**s, "image": torch.zeros_like(s["image"])} for s in samples]


def _scores(model, kind: str, train: list[dict], evals: list[dict], out_dir: str) -> dict:
    """``{"<shots>shot": metric}`` for 0 and 4 shots (CIDEr for captions, accuracy for VQA)."""
    settings = fewshot.FewShotSettings(shots=(0, 4), trial_seeds=(42,), num_samples=min(NUM_SAMPLES, len(evals)),
                                       query_set_size=len(train), batch_size=24, num_beams=3,
                                       max_new_tokens=8 if kind == "caption" else 3, progress=False,
                                       out_dir=out_dir, style=TRAINER)
    metric = "CIDEr" if kind == "caption" else "accuracy"
    results = fewshot.evaluate(model, kind, train, evals, settings)
    return {f"{shots}shot": results[shots][metric] for shots in results}


def generation_report(out_dir: str, data_dir: str, flamingo_dir: str) -> dict:
    """Score the Flamingo run in ``flamingo_dir`` (see the module docstring); returns flat metrics
    ``flamingo_cider_<k>shot``, ``flamingo_vqa_acc_<k>shot`` and their ``blind_`` twins, also written to
    ``<out_dir>/generation_metrics.json``."""
    run = load_run(flamingo_dir, "cuda" if torch.cuda.is_available() else "cpu")
    train = run.read(os.path.join(data_dir, "train-000000.tar"), "caption")
    evals = run.read(os.path.join(data_dir, "eval-000000.tar"), "caption")
    predictions = os.path.join(out_dir, "predictions")
    report = {}
    for name, kind, demos, queries in (("cider", "caption", train, evals),
                                       ("vqa_acc", "vqa", colour_questions(train), colour_questions(evals))):
        for prefix, shown in (("", queries), ("blind_", blinded(queries))):
            for shots, value in _scores(run.model, kind, demos, shown, predictions).items():
                report[f"flamingo_{prefix}{name}_{shots}"] = value
    with open(os.path.join(out_dir, "generation_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return report
