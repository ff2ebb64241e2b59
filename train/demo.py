"""The embedded demo (``make demo`` = ``python -m vlmcore.train.demo``): shapes -> CLIP -> Flamingo.

Steps (each skipped when its output already exists, so a second run only re-evaluates):

1. generate the shapes dataset into ``data/shapes`` and train a word-level tokenizer on its captions;
2. train the tiny CLIP (``configs/clip_tiny.yaml``) under ``deepspeed --num_gpus 2`` (CPU: two gloo
   ranks, ZeRO-2, fp32; GPU: one rank per GPU, bf16, Triton kernels);
3. pre-train the tiny Llama briefly on the caption text (the Flamingo LM is frozen, and a frozen
   *random* LM cannot write captions; this is the "pre-trained LM" of the recipe, at toy scale);
4. train the tiny Flamingo (``configs/flamingo_tiny.yaml``) with the CLIP's vision tower (frozen) and
   that LM (frozen), again under deepspeed ZeRO-2;
5. write ``runs/demo/final_metrics.json``: ``clip_zero_shot_top1`` (held-out shapes, classifier
   from label text), ``flamingo_caption_token_acc`` and ``flamingo_blind_token_acc`` (images
   blanked), and print them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib import resources

import torch

from . import shapes
from .tokenizer import EOC, MEDIA, Tokenizer, train_word_tokenizer

CONFIGS = resources.files("vlmcore.train") / "configs"


def _launcher_command(num_ranks: int) -> list[str]:
    bindir = os.path.dirname(sys.executable)
    launcher = os.path.join(bindir, "deepspeed")
    script = os.path.join(bindir, "vlmcore-train")
    for path in (launcher, script):
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} not found: install vlmcore with its [train] extra in this environment")
    return [launcher, "--num_gpus", str(num_ranks), "--master_port", str(_free_port()), script]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, log_path: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"command failed with exit code {proc.returncode} (log: {log_path}):\n{tail}")


def pretrain_lm(text_file: str, tok: Tokenizer, lm_config: dict, out_dir: str, steps: int, batch_size: int,
                seed: int = 0) -> float:
    """Train a causal LM (built from ``lm_config``) on the lines of ``text_file``, each written as
    ``<image> line <|endofchunk|> <eos>``; save it with ``save_pretrained``; returns the last loss."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    with open(text_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    rows, masks = [], []
    for line in lines:
        ids = tok.encode(f"{MEDIA} {line} {EOC}")[: tok.context_length - 1] + [tok.eos_token_id]
        padded, mask = tok.pad(ids)
        rows.append(padded)
        masks.append(mask)
    ids, mask = torch.tensor(rows), torch.tensor(masks)
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == tok.media_token_id, -100)
    options = dict(lm_config)
    model_type = options.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, **options)
    lm = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        pick = torch.randint(0, ids.shape[0], (batch_size,), generator=gen)
        width = int(mask[pick].sum(dim=1).max())  # drop the all-padding columns
        loss = lm(input_ids=ids[pick, :width], attention_mask=mask[pick, :width], labels=labels[pick, :width]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    lm.save_pretrained(out_dir)
    return float(loss.detach())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m vlmcore.train.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="run directory")
    parser.add_argument("--data", default="data/shapes", help="shapes dataset directory")
    parser.add_argument("--clip-steps", type=int, default=1000)
    parser.add_argument("--lm-steps", type=int, default=400)
    parser.add_argument("--flamingo-steps", type=int, default=300)
    parser.add_argument("--ranks", type=int, default=0, help="processes (default: 2 on CPU, every GPU on CUDA)")
    args = parser.parse_args(argv)
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    ranks = args.ranks or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # one core per CPU rank
    env["PYTHONWARNINGS"] = "ignore"

    with open(CONFIGS / "clip_tiny.yaml", encoding="utf-8") as f:
        import yaml

        clip_yaml = yaml.safe_load(f)
    with open(CONFIGS / "flamingo_tiny.yaml", encoding="utf-8") as f:
        flamingo_yaml = yaml.safe_load(f)
    s = clip_yaml["data"]["shapes"]
    if not shapes.is_complete(args.data):
        print(f"[demo] generating the shapes dataset in {args.data} ...", flush=True)
        summary = shapes.make_shapes(args.data, s["n_train"], s["n_eval"], s["n_docs"], s["image_size"],
                                     s["shard_size"])
        print(f"[demo] {summary}", flush=True)
    tok_path = os.path.join(args.data, "tokenizer.json")
    if not os.path.exists(tok_path):
        train_word_tokenizer(os.path.join(args.data, "captions.txt"), tok_path)
    data_overrides = [f"data.shapes.dir={args.data}", f"tokenizer.path={tok_path}",
                      f"data.eval.shards={args.data}/eval-*.tar"]

    clip_dir = os.path.join(args.out, clip_yaml["task"])
    if not os.path.isfile(os.path.join(clip_dir, "eval.json")):
        print(f"[demo] training CLIP ({args.clip_steps} steps, {ranks} ranks) -> {clip_dir}", flush=True)
        _run(_launcher_command(ranks) + [
            "--config", str(CONFIGS / "clip_tiny.yaml"), f"out_dir={clip_dir}", f"max_steps={args.clip_steps}",
            f"data.train.0.shards={args.data}/train-*.tar", "progress_bar=false", *data_overrides,
        ], env, os.path.join(args.out, "clip.log"))

    lm_dir = os.path.join(args.out, "lm")
    if not os.path.isfile(os.path.join(lm_dir, "config.json")):
        print(f"[demo] pre-training the tiny LM on the caption text ({args.lm_steps} steps) -> {lm_dir}", flush=True)
        tok = Tokenizer(tok_path, flamingo_yaml["tokenizer"]["context_length"])
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        loss = pretrain_lm(os.path.join(args.data, "captions.txt"), tok, flamingo_yaml["model"]["lm"]["config"],
                           lm_dir, args.lm_steps, batch_size=64)
        print(f"[demo] LM loss {loss:.3f}", flush=True)

    flamingo_dir = os.path.join(args.out, flamingo_yaml["task"])
    if not os.path.isfile(os.path.join(flamingo_dir, "eval.json")):
        print(f"[demo] training Flamingo ({args.flamingo_steps} steps, {ranks} ranks) -> {flamingo_dir}", flush=True)
        _run(_launcher_command(ranks) + [
            "--config", str(CONFIGS / "flamingo_tiny.yaml"), f"out_dir={flamingo_dir}",
            f"max_steps={args.flamingo_steps}", f"model.vision.init={clip_dir}/vision.safetensors",
            f"model.lm={{path: {lm_dir}}}", f"data.train.0.shards={args.data}/docs-*.tar",
            f"data.train.1.shards={args.data}/train-*.tar", "progress_bar=false", *data_overrides,
        ], env, os.path.join(args.out, "flamingo.log"))

    with open(os.path.join(clip_dir, "eval.json"), encoding="utf-8") as f:
        clip_eval = json.load(f)
    with open(os.path.join(flamingo_dir, "eval.json"), encoding="utf-8") as f:
        flamingo_eval = json.load(f)
    final = {
        "clip_zero_shot_top1": clip_eval["zero_shot_top1"],
        "flamingo_caption_token_acc": flamingo_eval["caption_token_acc"],
        "flamingo_blind_token_acc": flamingo_eval["blind_token_acc"],
        "clip_steps": clip_eval["step"],
        "flamingo_steps": flamingo_eval["step"],
        "ranks": ranks,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "seconds": round(time.time() - start, 1),
    }
    with open(os.path.join(args.out, "final_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(final, f, indent=1)
    print(json.dumps(final, indent=1))
    return final


if __name__ == "__main__":
    main()
