"""The BLIP demo (``python -m vlmcore.train.demo --family blip``): noisy captions -> BLIP -> CapFilt
-> BLIP again.

1. generate a small shapes dataset and its tokenizer; the first training shard plays the clean
   human-annotated set, the others the web data, copied with a fixed fraction of the captions
   (0.3) made wrong (colour or shape swapped); each sample's JSON records ``corrupted``;
2. pre-train a tiny BLIP (``blip_pretrain``: ITC + ITM + LM) on clean + noisy web (one rank,
   in-process);
3. fine-tune the filter (``blip_retrieval``) and the captioner (``blip_caption``) from it on the
   clean shard, as BLIP fine-tunes both on COCO;
4. run CapFilt on the web shards (nucleus sampling, threshold 0.5) and score the filter: precision
   and recall of "web caption dropped" against the known corruption;
5. pre-train the same BLIP from scratch on clean + bootstrapped web, with the same steps;
6. compare retrieval R@1 (ITC top-k re-ranked by ITM) on 24 held-out images, one per class with
   its own caption, and write ``<out>/blip/final_metrics.json``.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import time
from importlib import resources

from . import capfilt, shapes
from .cli import main as train_main
from .data import read_tar
from .tokenizer import train_word_tokenizer

CONFIGS = resources.files("vlmcore.train") / "configs"


def corrupt_shards(train_shards: list[str], out_dir: str, noise: float, seed: int = 0) -> dict:
    """Copy ``train_shards`` into ``out_dir`` with a fraction ``noise`` of the captions made wrong
    (colour or shape swapped); returns ``{"samples", "corrupted"}``."""
    rng = random.Random(seed)
    colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
    os.makedirs(out_dir, exist_ok=True)
    counts = {"samples": 0, "corrupted": 0}
    for shard in train_shards:
        path = os.path.join(out_dir, os.path.basename(shard))
        with tarfile.open(path + ".tmp", "w") as tar:
            for sample in read_tar(shard):
                meta = json.loads(sample["json"])
                caption = sample["txt"].decode()
                corrupted = rng.random() < noise
                if corrupted:
                    if rng.random() < 0.5:
                        wrong = rng.choice([c for c in colours if c != meta["colour"]])
                        caption = caption.replace(meta["colour"], wrong, 1)
                    else:
                        wrong = rng.choice([s for s in kinds if s != meta["shape"]])
                        caption = caption.replace(meta["shape"], wrong, 1)
                meta["corrupted"] = corrupted
                counts["samples"] += 1
                counts["corrupted"] += int(corrupted)
                for ext, data in (("png", sample["png"]), ("txt", caption.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(path + ".tmp", path)
    return counts


def filter_quality(noisy_shards: list[str], capfilt_dir: str) -> dict:
    """Precision / recall of the dropped web captions against the recorded corruption."""
    kept_web = set()
    for shard in noisy_shards:
        for sample in read_tar(os.path.join(capfilt_dir, os.path.basename(shard))):
            record = json.loads(sample["json"])
            if record["captions"][0]["kept"]:
                kept_web.add(sample["__key__"])
    dropped = corrupted = both = 0
    for shard in noisy_shards:
        for sample in read_tar(shard):
            is_dropped = sample["__key__"] not in kept_web
            is_corrupted = json.loads(sample["json"])["corrupted"]
            dropped += is_dropped
            corrupted += is_corrupted
            both += is_dropped and is_corrupted
    return {"web_dropped": dropped, "corrupted": corrupted, "dropped_and_corrupted": both,
            "drop_precision": both / max(dropped, 1), "drop_recall": both / max(corrupted, 1)}


def _train(task: str, out_dir: str, shards: str, data_dir: str, steps: int, batch_size: int, *extra: str) -> dict:
    """One in-process ``vlmcore-train`` run of ``configs/<task>_tiny.yaml`` (skipped when it already finished)."""
    if os.path.isfile(os.path.join(out_dir, "eval.json")):
        with open(os.path.join(out_dir, "eval.json"), encoding="utf-8") as f:
            return json.load(f)
    return train_main([
        "--config", str(CONFIGS / f"{task}_tiny.yaml"), f"out_dir={out_dir}", "data.shapes=null",
        f"tokenizer.path={data_dir}/tokenizer.json", "tokenizer.train_from_shapes=false",
        f"data.train.0.shards={shards}", f"data.train.0.batch_size={batch_size}",
        f"data.eval.shards={data_dir}/eval-000000.tar", "data.eval.batch_size=24", "data.eval.max_batches=1",
        f"max_steps={steps}", "save_every=0", f"eval_every={steps}", "progress_bar=false", *extra])


def run_blip_demo(out: str, steps: int = 1000, n_train: int = 3000, noise: float = 0.3, batch_size: int = 32) -> dict:
    start = time.time()
    root = os.path.join(out, "blip")
    data_dir = os.path.join(root, "shapes")
    if not shapes.is_complete(data_dir):
        print(f"[demo blip] generating {n_train} shapes images in {data_dir}", flush=True)
        shapes.make_shapes(data_dir, n_train, n_eval=48, n_docs=1, image_size=32, shard_size=1000)
    if not os.path.exists(os.path.join(data_dir, "tokenizer.json")):
        train_word_tokenizer(os.path.join(data_dir, "captions.txt"), os.path.join(data_dir, "tokenizer.json"))
    train_shards = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.startswith("train-"))
    # the first shard plays the human-annotated set (clean), the others the web data (noisy)
    clean_shard, web_shards = train_shards[0], train_shards[1:]
    noisy_dir = os.path.join(root, "noisy")
    counts = corrupt_shards(web_shards, noisy_dir, noise)
    noisy_shards = [os.path.join(noisy_dir, os.path.basename(s)) for s in web_shards]
    print(f"[demo blip] {counts['corrupted']} of {counts['samples']} web captions corrupted; "
          f"{clean_shard} stays clean", flush=True)

    noisy_run = os.path.join(root, "pretrain_noisy")
    print(f"[demo blip] pre-training on clean + noisy web ({steps} steps) -> {noisy_run}", flush=True)
    noisy_eval = _train("blip_pretrain", noisy_run, f"[{clean_shard}, '{noisy_dir}/train-*.tar']", data_dir, steps,
                        batch_size, "model.blip_pretrain.k_test=8")
    finetune_steps = max(1, steps // 3)
    filter_run, captioner_run = os.path.join(root, "filter"), os.path.join(root, "captioner")
    print(f"[demo blip] fine-tuning the filter (ITC + ITM) and the captioner (LM) on the clean shard "
          f"({finetune_steps} steps each)", flush=True)
    _train("blip_retrieval", filter_run, clean_shard, data_dir, finetune_steps, batch_size,
           f"model.blip_retrieval.init={noisy_run}", "model.blip_retrieval.k_test=8")
    _train("blip_caption", captioner_run, clean_shard, data_dir, finetune_steps, batch_size,
           f"model.blip_caption.init={noisy_run}")

    capfilt_dir = os.path.join(root, "capfilt")
    print(f"[demo blip] CapFilt on the web shards -> {capfilt_dir}", flush=True)
    report = capfilt.main(["--input", f"{noisy_dir}/train-*.tar", "--output", capfilt_dir, "--captioner",
                           captioner_run, "--filter", filter_run, "--tokenizer", f"{data_dir}/tokenizer.json",
                           "--batch-size", "64", "--max-length", "12", "--min-length", "4", "--context-length", "16",
                           "--no-progress"])
    if report["total"]["web_kept"] + report["total"]["synthetic_kept"] == 0:
        raise RuntimeError(f"CapFilt kept no caption ({capfilt_dir}/{capfilt.REPORT_NAME}): the filter rejects "
                           "everything; pre-train longer (--blip-steps)")
    quality = filter_quality(noisy_shards, capfilt_dir)

    boot_run = os.path.join(root, "pretrain_bootstrapped")
    print(f"[demo blip] pre-training on clean + bootstrapped web ({steps} steps) -> {boot_run}", flush=True)
    boot_eval = _train("blip_pretrain", boot_run, f"[{clean_shard}, '{capfilt_dir}/train-*.tar']", data_dir, steps,
                       batch_size, "model.blip_pretrain.k_test=8")

    metrics = {"noise": noise, "web_images": counts["samples"], "clean_images": n_train - counts["samples"],
               "corrupted": counts["corrupted"],
               "capfilt": report["total"], **quality,
               "noisy_i2t_R@1": noisy_eval["i2t_R@1"], "noisy_t2i_R@1": noisy_eval["t2i_R@1"],
               "bootstrapped_i2t_R@1": boot_eval["i2t_R@1"], "bootstrapped_t2i_R@1": boot_eval["t2i_R@1"],
               "steps": steps, "seconds": round(time.time() - start, 1)}
    with open(os.path.join(root, "final_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    print(json.dumps({k: v for k, v in metrics.items() if k != "capfilt"}, indent=1), flush=True)
    return metrics
