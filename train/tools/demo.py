"""The embedded demo (``make demo`` = ``python -m vlmcore.train.tools.demo``): shapes -> CLIP -> Flamingo.

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

``--family vilbert`` instead writes the region-feature variant of the shapes set into
``data/regions`` (``vlmcore-make-shapes --regions``) and pre-trains the tiny ViLBERT
(``configs/vilbert_tiny.yaml``) on it, reporting held-out alignment accuracy and R@1 in
``runs/demo/final_metrics_vilbert.json``.
``--family blip2`` replaces step 4 by BLIP-2 (``configs/blip2_stage1_tiny.yaml`` then
``configs/blip2_stage2_tiny.yaml``, both over the CLIP's frozen tower; stage 2 over a frozen LM of
the same shape pre-trained on the captions plus echoed captions, so that it reads its context as a
real LLM does, in ``lm_in_context``; its Q-Former from stage 1) and reports ``blip2_itc_i2t_R@1`` /
``blip2_itc_t2i_R@1`` (ITC), ``blip2_itm_i2t_R@1`` / ``blip2_itm_t2i_R@1`` (ITM re-ranked),
``blip2_caption_token_acc`` and ``blip2_blind_token_acc`` in ``runs/demo/final_metrics_blip2.json``.
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
from vlmcore.train.data.tokenizer import EOC, MEDIA, Tokenizer, train_word_tokenizer
from vlmcore.train.tools import shapes
from vlmcore.train.tools.demo_eval import generation_report
from vlmcore.train.tools.region_shapes import make_region_shapes, regions_complete

CONFIGS = resources.files("vlmcore.train") / "configs"
VILBERT_STEPS = 600
BLIP2_ECHO_WORDS = 8  # captions of the pairs (2-7 words), not the long documents


def _launcher_command(num_ranks: int) -> list[str]:
    """``deepspeed --num_gpus N --master_port P vlmcore-train`` from this environment's bin folder."""
    bindir = os.path.dirname(sys.executable)
    launcher = os.path.join(bindir, "deepspeed")
    script = os.path.join(bindir, "vlmcore-train")
    for path in (launcher, script):
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} not found: install vlmcore with its [train] extra in this environment")
    return [launcher, "--num_gpus", str(num_ranks), "--master_port", str(_free_port()), script]


def _free_port() -> int:
    """A TCP port free on this machine now (for the launcher's master)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, log_path: str) -> None:
    """Run ``cmd`` with its output in ``log_path``; RuntimeError with the log's tail when it fails."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"command failed with exit code {proc.returncode} (log: {log_path}):\n{tail}")


def pretrain_lm(text_file: str, tok: Tokenizer, lm_config: dict, out_dir: str, steps: int, batch_size: int,
                seed: int = 0, echo_words: int = 0) -> float:
    """Train a causal LM (built from ``lm_config``) on the lines of ``text_file``, each written as
    ``<image> line <|endofchunk|> <eos>``; save it with ``save_pretrained``; returns the last loss.

    ``echo_words > 0`` adds, for every line of at most that many words, the sequence
    ``<image> line <|endofchunk|> line <|endofchunk|> <eos>``: text whose continuation is stated
    earlier in the context. A real LLM learns to read its context from web text; an LM trained only
    on isolated captions never does, and then no soft prompt (BLIP-2's projected queries) can
    steer it (see the README's BLIP-2 section for the measured difference)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    with open(text_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if echo_words > 0:
        lines += [f"{line} {EOC} {line}" for line in lines if len(line.split()) <= echo_words]
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's flags (``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m vlmcore.train.tools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="run directory")
    parser.add_argument("--data", default="data/shapes", help="shapes dataset directory")
    parser.add_argument("--clip-steps", type=int, default=1000)
    parser.add_argument("--lm-steps", type=int, default=400)
    parser.add_argument("--flamingo-steps", type=int, default=300)
    parser.add_argument("--family", choices=("flamingo", "blip2", "vilbert", "blip"), default="flamingo",
                        help="flamingo (default) or blip2: what trains on the frozen CLIP tower and LM; "
                             "vilbert: ViLBERT on region features instead; blip: noisy captions -> BLIP -> "
                             "CapFilt -> BLIP (train/tools/demo_blip.py; uses --out, --blip-steps, --blip-seed)")
    parser.add_argument("--blip2-stage1-steps", type=int, default=300)
    parser.add_argument("--blip2-stage2-steps", type=int, default=300)
    parser.add_argument("--ranks", type=int, default=0, help="processes (default: 2 on CPU, every GPU on CUDA)")
    parser.add_argument("--regions", default="data/regions", help="--family vilbert: region-feature data directory")
    parser.add_argument("--vilbert-steps", type=int, default=VILBERT_STEPS)
    parser.add_argument("--blip-steps", type=int, default=1000, help="--family blip: steps of each pre-training")
    parser.add_argument("--blip-seed", type=int, default=0,
                        help="--family blip: seed of the data, the corruption, the trainings and CapFilt")
    return parser.parse_args(argv)


def _load_yaml(name: str) -> dict:
    """``configs/<name>`` as a dict."""
    import yaml

    with open(CONFIGS / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _device_name() -> str:
    """What the metrics files record as ``device``: the GPU's name, or ``cpu``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _prepare_shapes(data_dir: str, shapes_section: dict) -> list[str]:
    """Step 1: the shapes set as the tiny CLIP config's ``data.shapes`` describes it, and its tokenizer;
    returns the overrides that point a tiny config at them."""
    s = shapes_section
    if not shapes.is_complete(data_dir):
        print(f"[demo] generating the shapes dataset in {data_dir} ...", flush=True)
        summary = shapes.make_shapes(data_dir, s["n_train"], s["n_eval"], s["n_docs"], s["image_size"],
                                     s["shard_size"])
        print(f"[demo] {summary}", flush=True)
    tok_path = os.path.join(data_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        train_word_tokenizer(os.path.join(data_dir, "captions.txt"), tok_path)
    return [f"data.shapes.dir={data_dir}", f"tokenizer.path={tok_path}", f"data.eval.shards={data_dir}/eval-*.tar"]


def _train_clip(args, ranks: int, env: dict, clip_dir: str, data_overrides: list[str]) -> None:
    """Step 2: the tiny CLIP under deepspeed (skipped when ``clip_dir`` holds its evaluation)."""
    if os.path.isfile(os.path.join(clip_dir, "eval.json")):
        return
    print(f"[demo] training CLIP ({args.clip_steps} steps, {ranks} ranks) -> {clip_dir}", flush=True)
    _run(_launcher_command(ranks) + [
        "--config", str(CONFIGS / "clip_tiny.yaml"), f"out_dir={clip_dir}", f"max_steps={args.clip_steps}",
        f"data.train.0.shards={args.data}/train-*.tar", "progress_bar=false", *data_overrides,
    ], env, os.path.join(args.out, "clip.log"))


def _pretrain_demo_lm(args, flamingo_yaml: dict) -> str:
    """Step 3: the tiny LM pre-trained on the caption text (skipped when saved); returns its folder.

    BLIP-2's frozen LM must read its context (the projected queries are only a soft prompt): its
    tiny LM is pre-trained with echoed captions too (pretrain_lm's echo_words); Flamingo's reads
    the images through its own trainable cross-attention and keeps the plain caption LM."""
    echo_words = BLIP2_ECHO_WORDS if args.family == "blip2" else 0
    lm_dir = os.path.join(args.out, "lm_in_context" if echo_words else "lm")
    if os.path.isfile(os.path.join(lm_dir, "config.json")):
        return lm_dir
    print(f"[demo] pre-training the tiny LM on the caption text ({args.lm_steps} steps) -> {lm_dir}", flush=True)
    tok = Tokenizer(os.path.join(args.data, "tokenizer.json"), flamingo_yaml["tokenizer"]["context_length"])
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    loss = pretrain_lm(os.path.join(args.data, "captions.txt"), tok, flamingo_yaml["model"]["lm"]["config"],
                       lm_dir, args.lm_steps, batch_size=64, echo_words=echo_words)
    print(f"[demo] LM loss {loss:.3f}", flush=True)
    return lm_dir


def _train_flamingo(args, ranks: int, env: dict, flamingo_dir: str, clip_dir: str, lm_dir: str,
                    data_overrides: list[str]) -> None:
    """Step 4: the tiny Flamingo over the CLIP's frozen tower and the frozen LM (skipped when evaluated)."""
    if os.path.isfile(os.path.join(flamingo_dir, "eval.json")):
        return
    print(f"[demo] training Flamingo ({args.flamingo_steps} steps, {ranks} ranks) -> {flamingo_dir}", flush=True)
    _run(_launcher_command(ranks) + [
        "--config", str(CONFIGS / "flamingo_tiny.yaml"), f"out_dir={flamingo_dir}",
        f"max_steps={args.flamingo_steps}", f"model.vision.init={clip_dir}/vision.safetensors",
        f"model.lm={{path: {lm_dir}}}", f"data.train.0.shards={args.data}/docs-*.tar",
        f"data.train.1.shards={args.data}/train-*.tar", "progress_bar=false", *data_overrides,
    ], env, os.path.join(args.out, "flamingo.log"))


def _flamingo_metrics(args, ranks: int, start: float, clip_dir: str, flamingo_dir: str) -> dict:
    """Step 5: ``final_metrics.json`` from the two evaluations (written, printed and returned)."""
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
        "device": _device_name(),
        "seconds": round(time.time() - start, 1),
    }
    with open(os.path.join(args.out, "final_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(final, f, indent=1)
    print(json.dumps(final, indent=1))
    return final


def main(argv: list[str] | None = None) -> dict:
    """Run the demo of ``--family`` (module docstring); returns its final metrics."""
    args = parse_args(argv)
    if args.family == "blip":
        from vlmcore.train.tools.demo_blip import run_blip_demo

        return run_blip_demo(args.out, steps=args.blip_steps, seed=args.blip_seed)
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    ranks = args.ranks or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # one core per CPU rank
    env["PYTHONWARNINGS"] = "ignore"
    if args.family == "vilbert":
        return _vilbert(args, ranks, env, start)

    clip_yaml, flamingo_yaml = _load_yaml("clip_tiny.yaml"), _load_yaml("flamingo_tiny.yaml")
    data_overrides = _prepare_shapes(args.data, clip_yaml["data"]["shapes"])
    clip_dir = os.path.join(args.out, clip_yaml["task"])
    _train_clip(args, ranks, env, clip_dir, data_overrides)
    lm_dir = _pretrain_demo_lm(args, flamingo_yaml)
    if args.family == "blip2":
        return _blip2(args, ranks, env, start, clip_dir, lm_dir, data_overrides)
    flamingo_dir = os.path.join(args.out, flamingo_yaml["task"])
    _train_flamingo(args, ranks, env, flamingo_dir, clip_dir, lm_dir, data_overrides)
    final = _flamingo_metrics(args, ranks, start, clip_dir, flamingo_dir)
    return final | generation_report(args.out, args.data, flamingo_dir)


def _vilbert(args, ranks: int, env: dict, start: float) -> dict:
    """``--family vilbert``: region features of the shapes set (stand-in detector), then ViLBERT
    pre-training (MLM + masked regions + alignment) under deepspeed; reports held-out alignment
    accuracy (chance 0.5) and in-batch retrieval R@1 (chance 1/24) in ``final_metrics_vilbert.json``."""
    feature_dim = _load_yaml("vilbert_tiny.yaml")["model"]["vilbert"]["v_feature_size"]
    if not regions_complete(args.regions):
        print(f"[demo] generating the region-feature shapes set in {args.regions} ...", flush=True)
        print(f"[demo] {make_region_shapes(args.regions, 4000, 240, feature_dim=feature_dim)}", flush=True)
    run_dir = os.path.join(args.out, "vilbert")
    if not os.path.isfile(os.path.join(run_dir, "eval.json")):
        print(f"[demo] training ViLBERT ({args.vilbert_steps} steps, {ranks} ranks) -> {run_dir}", flush=True)
        _run(_launcher_command(ranks) + [
            "--config", str(CONFIGS / "vilbert_tiny.yaml"), f"out_dir={run_dir}", f"max_steps={args.vilbert_steps}",
            f"data.train.0.shards={args.regions}/regions-train-*.tar",
            f"data.eval.shards={args.regions}/regions-eval-*.tar", f"tokenizer.path={args.regions}/tokenizer.json",
            "progress_bar=false",
        ], env, os.path.join(args.out, "vilbert.log"))
    with open(os.path.join(run_dir, "eval.json"), encoding="utf-8") as f:
        result = json.load(f)
    final = {"vilbert_alignment_acc": result["alignment_acc"], "vilbert_i2t_R@1": result["i2t_r1"],
             "vilbert_t2i_R@1": result["t2i_r1"], "vilbert_eval_pairs": result["eval_samples"],
             "vilbert_steps": result["step"], "ranks": ranks,
             "device": _device_name(),
             "seconds": round(time.time() - start, 1)}
    with open(os.path.join(args.out, "final_metrics_vilbert.json"), "w", encoding="utf-8") as f:
        json.dump(final, f, indent=1)
    print(json.dumps(final, indent=1))
    return final


def _blip2(args, ranks: int, env: dict, start: float, clip_dir: str, lm_dir: str, data_overrides: list[str]) -> dict:
    """BLIP-2 stage 1 then stage 2 over the CLIP's frozen tower (and, stage 2, the pre-trained frozen LM)."""
    common = [f"model.vision.init={clip_dir}/vision.safetensors", f"data.train.0.shards={args.data}/train-*.tar",
              "progress_bar=false", *data_overrides]
    stage1_dir = os.path.join(args.out, "blip2_stage1")
    if not os.path.isfile(os.path.join(stage1_dir, "eval.json")):
        print(f"[demo] training BLIP-2 stage 1 ({args.blip2_stage1_steps} steps, {ranks} ranks) -> {stage1_dir}",
              flush=True)
        _run(_launcher_command(ranks) + [
            "--config", str(CONFIGS / "blip2_stage1_tiny.yaml"), f"out_dir={stage1_dir}",
            f"max_steps={args.blip2_stage1_steps}", *common,
        ], env, os.path.join(args.out, "blip2_stage1.log"))
    stage2_dir = os.path.join(args.out, "blip2_stage2")
    if not os.path.isfile(os.path.join(stage2_dir, "eval.json")):
        print(f"[demo] training BLIP-2 stage 2 ({args.blip2_stage2_steps} steps, {ranks} ranks) -> {stage2_dir}",
              flush=True)
        _run(_launcher_command(ranks) + [
            "--config", str(CONFIGS / "blip2_stage2_tiny.yaml"), f"out_dir={stage2_dir}",
            f"max_steps={args.blip2_stage2_steps}", f"model.lm={{path: {lm_dir}}}",
            f"model.blip2_stage2.stage1_init={stage1_dir}/trainable.safetensors", *common,
        ], env, os.path.join(args.out, "blip2_stage2.log"))
    evals = {}
    for name, path in (("clip", clip_dir), ("stage1", stage1_dir), ("stage2", stage2_dir)):
        with open(os.path.join(path, "eval.json"), encoding="utf-8") as f:
            evals[name] = json.load(f)
    final = {"clip_zero_shot_top1": evals["clip"]["zero_shot_top1"]}
    for key in ("itc_i2t_R@1", "itc_t2i_R@1", "itm_i2t_R@1", "itm_t2i_R@1", "itc_i2t_R@5", "itm_i2t_R@5"):
        final[f"blip2_{key}"] = evals["stage1"][key]
    final.update({
        "blip2_caption_token_acc": evals["stage2"]["caption_token_acc"],
        "blip2_blind_token_acc": evals["stage2"]["blind_token_acc"],
        "blip2_eval_pairs": evals["stage1"]["eval_samples"],
        "blip2_stage1_steps": evals["stage1"]["step"],
        "blip2_stage2_steps": evals["stage2"]["step"],
        "ranks": ranks,
        "device": _device_name(),
        "seconds": round(time.time() - start, 1),
    })
    with open(os.path.join(args.out, "final_metrics_blip2.json"), "w", encoding="utf-8") as f:
        json.dump(final, f, indent=1)
    print(json.dumps(final, indent=1))
    return final


if __name__ == "__main__":
    main()
