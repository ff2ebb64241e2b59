"""The BLIP demo (``python -m vlmcore.train.tools.demo --family blip``): noisy captions -> BLIP -> CapFilt
-> BLIP again.

1. generate a small shapes dataset and its tokenizer; the first training shard plays the clean
   human-annotated set, the others the web data, copied with a fixed fraction of the captions
   (0.3) made wrong (colour or shape swapped); each sample's JSON records ``corrupted``;
2. pre-train a tiny BLIP (``blip_pretrain``: ITC + ITM + LM) on clean + noisy web (one rank,
   in-process);
3. fine-tune the filter (``blip_retrieval``) and the captioner (``blip_caption``) from it on the
   clean shard, as BLIP fine-tunes both on COCO;
4. run CapFilt on the web shards (nucleus sampling, threshold 0.5) and score the filter against the
   known corruption: precision and recall of "web caption dropped", and the ROC AUC of its ITM
   match probability (threshold-free);
5. pre-train the same BLIP from scratch on clean + bootstrapped web, with the same steps;
6. compare retrieval R@1 (ITC top-k re-ranked by ITM) of the two pre-trainings on the held-out
   split: 10 disjoint groups of 24 images (one per class, each with its caption), R@1 within each
   group, averaged; write ``<out>/blip/final_metrics.json``.

Image ids. Every shapes image of one class shows the same thing (only size, place and background
vary), so the demo gives all images of a class one ``image_id`` (the class index) in their JSON:
BLIP's image-id handling then makes same-class pairs ITC positives and never ITM negatives, as a
COCO image's five captions are in BLIP's retrieval fine-tuning. With per-image ids, 24 classes and
a batch of 32, most rows have a same-class caption in the batch; the hard-negative sampler then
mostly draws such true matches as "negatives", and the ITM head (the filter) cannot learn. The id
comes from the image's true class, never from the caption, so a corrupted caption stays noise.
"""

from __future__ import annotations

import json
import os
import random
import time
from importlib import resources

import torch
from vlmcore.train.cli import main as train_main
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.pipeline import decode_image, read_tar
from vlmcore.train.data.tar_writer import TarWriter
from vlmcore.train.data.tokenizer import Tokenizer, train_word_tokenizer
from vlmcore.train.tools import capfilt, shapes
from vlmcore.train.tools.shape_drawing import CLASSNAMES, COLOURS, SHAPES

from vlmcore.blip import blip_retrieval_metrics, load_blip

CONFIGS = resources.files("vlmcore.train") / "configs"


def _corrupt_caption(rng: random.Random, caption: str, meta: dict) -> str:
    """``caption`` with its colour (half the time) or its shape swapped for another at random."""
    if rng.random() < 0.5:
        wrong = rng.choice([c for c in COLOURS if c != meta["colour"]])
        return caption.replace(meta["colour"], wrong, 1)
    wrong = rng.choice([s for s in SHAPES if s != meta["shape"]])
    return caption.replace(meta["shape"], wrong, 1)


def corrupt_shards(train_shards: list[str], out_dir: str, noise: float, seed: int = 0) -> dict:
    """Copy ``train_shards`` into ``out_dir`` with a fraction ``noise`` of the captions made wrong
    (colour or shape swapped) and the image's class index as ``image_id`` (module docstring);
    returns ``{"samples", "corrupted"}``."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    counts = {"samples": 0, "corrupted": 0}
    for shard in train_shards:
        with TarWriter(os.path.join(out_dir, os.path.basename(shard))) as tar:
            for sample in read_tar(shard):
                meta = json.loads(sample["json"])
                caption = sample["txt"].decode()
                corrupted = rng.random() < noise
                if corrupted:
                    caption = _corrupt_caption(rng, caption, meta)
                meta["corrupted"] = corrupted
                meta["image_id"] = meta["label"]
                counts["samples"] += 1
                counts["corrupted"] += int(corrupted)
                tar.write_sample(sample["__key__"], {"png": sample["png"], "txt": caption.encode(),
                                                     "json": json.dumps(meta).encode()})
    return counts


@torch.no_grad()
def filter_quality(noisy_shards: list[str], capfilt_dir: str, filter_run: str, tokenizer_path: str,
                   context_length: int = 16) -> dict:
    """The filter against the recorded corruption: precision / recall of the web captions CapFilt
    dropped, and the ROC AUC of the filter's ITM match probability over every web caption (1.0:
    every clean caption scores above every corrupted one; 0.5: chance), threshold-free."""
    kept_web = set()
    for shard in noisy_shards:
        for sample in read_tar(os.path.join(capfilt_dir, os.path.basename(shard))):
            if json.loads(sample["json"])["captions"][0]["kept"]:
                kept_web.add(sample["__key__"])
    model, text, image_size = _open_for_eval(filter_run, tokenizer_path, context_length)
    dropped = corrupted = both = 0
    scores, labels = [], []
    for shard in noisy_shards:
        samples = list(read_tar(shard))
        for i in range(0, len(samples), 128):
            chunk = samples[i:i + 128]
            images = torch.stack([decode_image(s["png"], image_size) for s in chunk])
            ids, mask = text.encode([s["txt"].decode() for s in chunk])
            scores += model.itm_match_probability(images, ids, mask).tolist()
        for sample in samples:
            is_dropped = sample["__key__"] not in kept_web
            is_corrupted = json.loads(sample["json"])["corrupted"]
            labels.append(is_corrupted)
            dropped += is_dropped
            corrupted += is_corrupted
            both += is_dropped and is_corrupted
    return {"web_dropped": dropped, "corrupted": corrupted, "dropped_and_corrupted": both,
            "drop_precision": both / max(dropped, 1), "drop_recall": both / max(corrupted, 1),
            "filter_auc": roc_auc([sc for sc, c in zip(scores, labels) if not c],
                                  [sc for sc, c in zip(scores, labels) if c])}


def _open_for_eval(run_dir: str, tokenizer_path: str, context_length: int) -> tuple:
    """``(BLIP of run_dir without momentum encoders, in eval mode; its BlipText; its image size)``."""
    model = load_blip(run_dir, momentum=None).eval()
    return model, BlipText(Tokenizer(tokenizer_path, context_length, media_tokens=False)), \
        model.spec["vision"]["image_size"]


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney U statistic)."""
    if not positive or not negative:
        raise ValueError(f"roc_auc needs scores on both sides, got {len(positive)} positive, {len(negative)} negative")
    pos, neg = torch.tensor(positive, dtype=torch.float64), torch.tensor(negative, dtype=torch.float64)
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


@torch.no_grad()
def grouped_retrieval(run_dir: str, eval_shard: str, tokenizer_path: str, groups: int, k_test: int = 8,
                      context_length: int = 16) -> dict:
    """Retrieval R@1/5 of the BLIP checkpoint in ``run_dir`` within each of ``groups`` consecutive
    groups of 24 held-out samples (the eval split cycles through the 24 classes, so each group is
    one image per class with its caption), averaged over the groups."""
    model, text, image_size = _open_for_eval(run_dir, tokenizer_path, context_length)
    samples = list(read_tar(eval_shard))
    group_size = len(CLASSNAMES)
    if len(samples) < groups * group_size:
        raise ValueError(f"{eval_shard} has {len(samples)} samples, fewer than {groups} groups of {group_size}")
    totals: dict[str, float] = {}
    for g in range(groups):
        chunk = samples[g * group_size:(g + 1) * group_size]
        images = torch.stack([decode_image(s["png"], image_size) for s in chunk])
        ids, mask = text.encode([s["txt"].decode() for s in chunk])
        score_i2t, score_t2i = model.retrieval_scores(images, ids, mask, k_test=k_test)
        for key, value in blip_retrieval_metrics(score_i2t, score_t2i, ks=(1, 5)).items():
            totals[key] = totals.get(key, 0.0) + value / groups
    return totals


def _train(task: str, out_dir: str, shards: str, data_dir: str, steps: int, batch_size: int, seed: int,
           *extra: str) -> dict:
    """One in-process ``vlmcore-train`` run of ``configs/<task>_tiny.yaml`` (skipped when it already finished)."""
    if os.path.isfile(os.path.join(out_dir, "eval.json")):
        with open(os.path.join(out_dir, "eval.json"), encoding="utf-8") as f:
            return json.load(f)
    return train_main([
        "--config", str(CONFIGS / f"{task}_tiny.yaml"), f"out_dir={out_dir}", "data.shapes=null",
        f"tokenizer.path={data_dir}/tokenizer.json", "tokenizer.train_from_shapes=false",
        f"data.train.0.shards={shards}", f"data.train.0.batch_size={batch_size}",
        f"data.eval.shards={data_dir}/eval-000000.tar", "data.eval.batch_size=24", "data.eval.max_batches=1",
        f"max_steps={steps}", "save_every=0", f"eval_every={steps}", "progress_bar=false", f"seed={seed}", *extra])


def _make_data(data_dir: str, n_train: int, n_eval: int, seed: int) -> str:
    """Step 1a: the shapes set (32-pixel images, one document) and its word-level tokenizer; returns
    the tokenizer's path."""
    if not shapes.is_complete(data_dir):
        print(f"[demo blip] generating {n_train} + {n_eval} shapes images in {data_dir}", flush=True)
        shapes.make_shapes(data_dir, n_train, n_eval=n_eval, n_docs=1, image_size=32, shard_size=1000, seed=seed)
    tokenizer_path = os.path.join(data_dir, "tokenizer.json")
    if not os.path.exists(tokenizer_path):
        train_word_tokenizer(os.path.join(data_dir, "captions.txt"), tokenizer_path)
    return tokenizer_path


def _split_clean_and_web(root: str, data_dir: str, noise: float, seed: int) -> tuple[str, str, list[str], dict]:
    """Step 1b: the first training shard plays the human-annotated set (clean), the others the web
    data (noisy); returns ``(clean shard, noisy folder, noisy shards, corruption counts)``."""
    train_shards = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.startswith("train-"))
    clean_dir, noisy_dir = os.path.join(root, "clean"), os.path.join(root, "noisy")
    corrupt_shards(train_shards[:1], clean_dir, 0.0)  # clean: only the class image ids are added
    clean_shard = os.path.join(clean_dir, os.path.basename(train_shards[0]))
    counts = corrupt_shards(train_shards[1:], noisy_dir, noise, seed=seed)
    noisy_shards = [os.path.join(noisy_dir, os.path.basename(s)) for s in train_shards[1:]]
    print(f"[demo blip] {counts['corrupted']} of {counts['samples']} web captions corrupted; "
          f"{clean_shard} stays clean", flush=True)
    return clean_shard, noisy_dir, noisy_shards, counts


def _train_noisy_filter_captioner(root: str, data_dir: str, clean_shard: str, noisy_dir: str, steps: int,
                                  filter_steps: int, batch_size: int, seed: int) -> tuple[str, str, str]:
    """Steps 2-3: pre-train on clean + noisy web, fine-tune the filter and the captioner from it on the
    clean shard; returns their run folders ``(pre-training, filter, captioner)``."""
    noisy_run = os.path.join(root, "pretrain_noisy")
    print(f"[demo blip] pre-training on clean + noisy web ({steps} steps) -> {noisy_run}", flush=True)
    _train("blip_pretrain", noisy_run, f"[{clean_shard}, '{noisy_dir}/train-*.tar']", data_dir, steps,
           batch_size, seed, "model.blip_pretrain.k_test=8")
    finetune_steps = max(1, steps // 3)
    filter_run, captioner_run = os.path.join(root, "filter"), os.path.join(root, "captioner")
    print(f"[demo blip] fine-tuning the filter (ITC + ITM, {filter_steps} steps) and the captioner (LM, "
          f"{finetune_steps} steps) on the clean shard", flush=True)
    _train("blip_retrieval", filter_run, clean_shard, data_dir, filter_steps, batch_size, seed,
           f"model.blip_retrieval.init={noisy_run}", "model.blip_retrieval.k_test=8")
    _train("blip_caption", captioner_run, clean_shard, data_dir, finetune_steps, batch_size, seed,
           f"model.blip_caption.init={noisy_run}")
    return noisy_run, filter_run, captioner_run


def _run_capfilt(capfilt_dir: str, noisy_dir: str, captioner_run: str, filter_run: str, tokenizer_path: str,
                 seed: int) -> dict:
    """Step 4: CapFilt over the web shards into ``capfilt_dir``; returns its report (RuntimeError when
    it kept no caption at all)."""
    print(f"[demo blip] CapFilt on the web shards -> {capfilt_dir}", flush=True)
    report = capfilt.main(["--input", f"{noisy_dir}/train-*.tar", "--output", capfilt_dir, "--captioner",
                           captioner_run, "--filter", filter_run, "--tokenizer", tokenizer_path,
                           "--batch-size", "64", "--max-length", "12", "--min-length", "4", "--context-length", "16",
                           "--seed", str(seed), "--no-progress"])
    if report["total"]["web_kept"] + report["total"]["synthetic_kept"] == 0:
        raise RuntimeError(f"CapFilt kept no caption ({capfilt_dir}/{capfilt.REPORT_NAME}): the filter rejects "
                           "everything; pre-train longer (--blip-steps)")
    return report


def run_blip_demo(out: str, steps: int = 1000, n_train: int = 3000, noise: float = 0.3, batch_size: int = 32,
                  seed: int = 0, eval_groups: int = 10, filter_steps: int | None = None) -> dict:
    """Steps 1-6 of the module docstring under ``<out>/blip``; returns the final metrics. A rerun
    skips every stage whose output exists (delete ``<out>/blip`` to start over)."""
    start = time.time()
    root = os.path.join(out, "blip")
    data_dir = os.path.join(root, "shapes")
    tokenizer_path = _make_data(data_dir, n_train, eval_groups * len(CLASSNAMES), seed)
    clean_shard, noisy_dir, noisy_shards, counts = _split_clean_and_web(root, data_dir, noise, seed)
    noisy_run, filter_run, captioner_run = _train_noisy_filter_captioner(
        root, data_dir, clean_shard, noisy_dir, steps, filter_steps or steps, batch_size, seed)
    capfilt_dir = os.path.join(root, "capfilt")
    report = _run_capfilt(capfilt_dir, noisy_dir, captioner_run, filter_run, tokenizer_path, seed)
    quality = filter_quality(noisy_shards, capfilt_dir, filter_run, tokenizer_path)

    boot_run = os.path.join(root, "pretrain_bootstrapped")
    print(f"[demo blip] pre-training on clean + bootstrapped web ({steps} steps) -> {boot_run}", flush=True)
    _train("blip_pretrain", boot_run, f"[{clean_shard}, '{capfilt_dir}/train-*.tar']", data_dir, steps,
           batch_size, seed, "model.blip_pretrain.k_test=8")

    eval_shard = os.path.join(data_dir, "eval-000000.tar")
    print(f"[demo blip] retrieval on {eval_groups} held-out groups of {len(CLASSNAMES)} images", flush=True)
    noisy_eval = grouped_retrieval(noisy_run, eval_shard, tokenizer_path, eval_groups)
    boot_eval = grouped_retrieval(boot_run, eval_shard, tokenizer_path, eval_groups)
    metrics = {"noise": noise, "seed": seed, "web_images": counts["samples"],
               "clean_images": n_train - counts["samples"], "corrupted": counts["corrupted"],
               "capfilt": report["total"], **quality, "eval_groups": eval_groups,
               **{f"noisy_{k}": v for k, v in noisy_eval.items()},
               **{f"bootstrapped_{k}": v for k, v in boot_eval.items()},
               "steps": steps, "seconds": round(time.time() - start, 1)}
    with open(os.path.join(root, "final_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    print(json.dumps({k: v for k, v in metrics.items() if k != "capfilt"}, indent=1), flush=True)
    return metrics
