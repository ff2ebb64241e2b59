"""Evaluate-only from a run directory: ``vlmcore-eval run --checkpoint RUN_DIR --data ... --metric ...``.

A training run exports its trainable weights next to its resolved ``config.json``; the frozen parts
(LM, frozen vision tower) are rebuilt from that config. Rebuilding is the trainer's knowledge (its
task registry, towers, tokenizers), and this library does not import the trainer: the trainer
registers a *run loader* under the entry point group :data:`RUN_LOADERS` (``setup.py``), found
here at run time. A loader is ``load(run_dir, device) -> LoadedRun``.

Metrics: ``cider`` (captioning: CIDEr, BLEU-4, METEOR, ROUGE-L), ``vqa`` (VQA accuracy), ``top1``
(classification by log-likelihood; ROC AUC too for two classes). Few-shot options follow
OpenFlamingo's flags (``--shots``, ``--trials`` / ``--trial-seeds``, ``--num-samples``,
``--query-set-size``, ``--rices``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch

from vlmcore.eval import classification, fewshot
from vlmcore.eval.prompts import PROMPT_STYLES
from vlmcore.eval.rices import Rices, cached_features, image_features
from vlmcore.vision import pooled_features

RUN_LOADERS = "vlmcore.run_loaders"
METRIC_KINDS = {"cider": "caption", "vqa": "vqa", "top1": "classify"}
DEFAULT_TRIAL_SEEDS = (42, 43, 44, 45, 46)  # OpenFlamingo's --trial_seeds default is 42; trials count up


#: ``videos(data, num_frames, batch_size, max_samples) -> (batches, counts)``: see :class:`LoadedRun`.
VideoReader = Callable[[str, int, int, int], tuple[list[dict], dict]]


@dataclass
class LoadedRun:
    """What a run loader returns: the eval model (``generate``; ``class_logprobs`` for ``top1``),
    ``read(data, kind) -> samples`` (the run's eval image transform applied; samples as
    :mod:`vlmcore.eval.fewshot` / :mod:`vlmcore.eval.classification` describe them), and ``vision``:
    the tower whose pooled output is the RICES embedding.

    A run whose task scores videos (BLIP retrieval) also has ``videos``: the task's video eval encoder
    over the shards ``data`` (``num_frames`` frames per clip), the first ``max_samples`` usable
    samples (0 = all) collated in batches of ``batch_size`` (the fields of
    :data:`vlmcore.eval.video_retrieval.FIELDS`), and the counts of usable and skipped samples
    (``eval_usable_samples``, ``eval_skipped_samples``, ``eval_skipped/<reason>``). Its ``model`` is
    then the vlmcore model itself when the task does not generate text (``read`` refuses).
    """

    model: object
    read: Callable[[str, str], list[dict]]
    vision: torch.nn.Module
    videos: VideoReader | None = None


def load_run(run_dir: str, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the model of ``run_dir`` with the installed run loader (the trainer's)."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.json")
    loaders = list(entry_points(group=RUN_LOADERS))
    if not loaders:
        raise RuntimeError(f"no run loader is installed (entry point group {RUN_LOADERS!r}): reinstall vlmcore "
                           "with its trainer (pip install -e '.[train]')")
    return loaders[0].load()(run_dir, torch.device(device))


def rices_for(run: LoadedRun, train: Sequence[dict], eval_set: Sequence[dict], cache_path: str,
              batch_size: int) -> tuple[Rices, torch.Tensor]:
    """RICES over ``train`` in the run's tower embedding (training features cached at ``cache_path``)
    and the eval images' features ``[len(eval_set), D]``."""
    device, dtype = next((p.device, p.dtype) for p in run.vision.parameters())

    def features(samples):
        batches = (torch.stack([s["image"] for s in samples[i:i + batch_size]]).to(device, dtype)
                   for i in range(0, len(samples), batch_size))
        return image_features(lambda images: pooled_features(run.vision, images), batches)

    return Rices(cached_features(cache_path, lambda: features(train))), features(eval_set)


def run_from_checkpoint(run_dir: str, data: str, metric: str, *, demo_data: str = "", shots: Sequence[int] = (0,),
                        trial_seeds: Sequence[int] = (42,), num_samples: int = 0, query_set_size: int = 2048,
                        batch_size: int = 8, max_new_tokens: int | None = None, num_beams: int = 3,
                        use_rices: bool = False, class_names: Sequence[str] = (), out_dir: str = "",
                        device: str = "cpu", progress: bool = True, prompt_style: str = "openflamingo") -> dict:
    """Score the model of ``run_dir`` on ``data`` (shards) by ``metric``; writes predictions and
    ``eval_<metric>.json`` into ``out_dir`` (default ``<run_dir>/eval``) and returns the metrics.

    ``demo_data``: the shards demonstrations come from (needed for shots > 0; without it 0-shot
    prompts carry no text demonstrations). ``max_new_tokens``: default 20 for captions, 5 for VQA.
    ``prompt_style``: a name of :data:`~vlmcore.eval.prompts.PROMPT_STYLES` (``trainer``: the layout
    ``data.eval.generation.prompt_style: trainer`` decodes with during training).
    """
    if metric not in METRIC_KINDS:
        raise ValueError(f"metric must be one of {sorted(METRIC_KINDS)}, got {metric!r}")
    kind = METRIC_KINDS[metric]
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {sorted(PROMPT_STYLES)}, got {prompt_style!r}")
    if (any(s > 0 for s in shots) or use_rices) and not demo_data:
        raise ValueError("shots > 0 and RICES need demonstrations: pass demo_data (--demo-data shards)")
    out_dir = out_dir or os.path.join(run_dir, "eval")
    run = load_run(run_dir, device)
    eval_set = run.read(data, kind)
    train = run.read(demo_data, kind) if demo_data else []
    rices = eval_features = None
    if use_rices:
        rices, eval_features = rices_for(run, train, eval_set, os.path.join(out_dir, "rices_features.pt"), batch_size)
    if kind == "classify":
        results = {str(s): _classification_trials(run.model, train, eval_set, class_names, s, trial_seeds,
                                                  num_samples, query_set_size, batch_size) for s in shots}
    else:
        settings = fewshot.FewShotSettings(
            shots=shots, trial_seeds=trial_seeds, num_samples=num_samples, query_set_size=query_set_size,
            batch_size=batch_size, max_new_tokens=max_new_tokens or (20 if kind == "caption" else 5),
            num_beams=num_beams, progress=progress, out_dir=out_dir, style=PROMPT_STYLES[prompt_style])
        results = fewshot.evaluate(run.model, kind, train, eval_set, settings, rices, eval_features)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"eval_{metric}.json"), "w", encoding="utf-8") as f:
        json.dump({"checkpoint": run_dir, "data": data, "metric": metric, "results": results}, f, indent=1)
    return results


def _classification_trials(model, train, eval_set, class_names, num_shots, seeds, num_samples, query_set_size,
                           batch_size) -> dict:
    """Mean classification metrics over the trial seeds (one rank)."""
    if not class_names:
        raise ValueError("metric top1 needs the class names (--classes FILE)")
    trials = [classification.classification_metrics(classification.classify(
        model, train, eval_set, class_names, num_shots=num_shots, seed=seed, num_samples=num_samples,
        query_set_size=query_set_size, batch_size=batch_size), class_names) for seed in seeds]
    return {"trials": trials, **{m: sum(t[m] for t in trials) / len(trials) for m in trials[0]}}


def read_class_names(path: str) -> list[str]:
    """Class names from a JSON file: a list, or ``{"classnames": [...]}`` (the shapes' ``classes.json``)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return list(data["classnames"] if isinstance(data, dict) else data)


def run_results(args: argparse.Namespace) -> dict:
    """``vlmcore-eval run``: evaluate; the metrics (the CLI prints them as one JSON object, last line)."""
    seeds = args.trial_seeds or list(DEFAULT_TRIAL_SEEDS[: args.trials])
    return run_from_checkpoint(
        args.checkpoint, args.data, args.metric, demo_data=args.demo_data, shots=args.shots, trial_seeds=seeds,
        num_samples=args.num_samples, query_set_size=args.query_set_size, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, use_rices=args.rices,
        class_names=read_class_names(args.classes) if args.classes else (), out_dir=args.out, device=args.device,
        prompt_style=args.prompt_style)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand to ``vlmcore-eval``'s subparsers (handler: ``run``, see :mod:`vlmcore.eval.cli`)."""
    p = subparsers.add_parser("run", help="evaluate a run directory's model by generation / few-shot / log-likelihood",
                              description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory (config.json + exported weights)")
    p.add_argument("--data", required=True, help="evaluation shards (pattern or list)")
    p.add_argument("--metric", required=True, choices=sorted(METRIC_KINDS))
    p.add_argument("--demo-data", default="", help="shards the demonstrations come from (the training split)")
    p.add_argument("--shots", type=int, nargs="+", default=[0], help="e.g. 0 4 8 16 32")
    p.add_argument("--trials", type=int, default=1, help=f"trials, seeds {DEFAULT_TRIAL_SEEDS[0]}, ... (at most 5)")
    p.add_argument("--trial-seeds", type=int, nargs="+", default=None, help="explicit trial seeds (over --trials)")
    p.add_argument("--num-samples", type=int, default=0, help="evaluated samples (0 = all)")
    p.add_argument("--query-set-size", type=int, default=2048, help="pool of the random demonstrations")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 20 (captions) / 5 (VQA)")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--prompt-style", default="openflamingo", choices=sorted(PROMPT_STYLES),
                   help="openflamingo: '<image>Output:'; trainer: '<image>' as the trainer writes pairs "
                        "(data.eval.generation.prompt_style; for word-level tokenizers)")
    p.add_argument("--rices", action="store_true", help="demos = nearest training images (the run's own tower)")
    p.add_argument("--classes", default="", help="top1: JSON class names (a list or {'classnames': [...]})")
    p.add_argument("--out", default="", help="output folder (default RUN_DIR/eval)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(run=run_results)
    return p
