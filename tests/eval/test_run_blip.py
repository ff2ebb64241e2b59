"""BLIP captioning and BLIP-2 stage 2 end to end: a tiny run with ``data.eval.eval: generate`` logs
caption metrics to metrics.jsonl, then ``vlmcore-eval run`` (in-process) rebuilds the exported model
from the run directory and prints its CIDEr, scored by COCOEvalCap's own scorers (pycocoevalcap + Java);
and BLIP-2's prompted zero-shot VQA on a rebuilt run (the last test)."""

import json
import shutil

import pytest
from helpers.training import read_metrics, train_argv
from vlmcore.train import main
from vlmcore.train.tools import demo_eval

from vlmcore.eval import cli, fewshot, run
from vlmcore.eval.prompts import TRAINER

TINY_BLIP_TEXT = "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}"
TINY_LM = ("model.lm={config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
           "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}}")
TINY_QFORMER = ("model.blip2_stage2.qformer={hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 48, "
                "num_query_tokens: 4, max_position_embeddings: 32}")
# Per family: the task and its tiny model (BLIP's own text transformer; BLIP-2's random Q-Former + LM).
FAMILIES = {
    "blip_caption": ("blip_caption", f"model.blip_caption.text={TINY_BLIP_TEXT}", "model.blip_caption.embed_dim=16"),
    "blip2_stage2": ("blip2_stage2", TINY_LM, TINY_QFORMER, "model.vision.freeze=true"),
}


@pytest.fixture
def scored(monkeypatch):
    """The real ``score_captions`` (COCOEvalCap's scorers), recording how many predictions each call scores."""
    from vlmcore.eval import captions

    counts, real = [], captions.score_captions

    def recording(predictions, references, *, spice=False):
        counts.append(len(predictions))
        return real(predictions, references, spice=spice)

    monkeypatch.setattr(captions, "score_captions", recording)
    return counts


def _captions(path) -> dict:
    """A predictions file (COCO results) as ``{image_id: caption}``."""
    return {p["image_id"]: p["caption"] for p in json.loads(path.read_text(encoding="utf-8"))}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_during_training_then_evaluate_the_exported_run(family, data, tmp_path, scored, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("VLMCORE_BACKEND", "reference")  # the kernels are covered by their own tests
    task, *model = FAMILIES[family]
    out = tmp_path / family
    main(train_argv(task, data, out, "max_steps=4", "save_every=4", "eval_every=4", "optim.warmup_steps=1",
                    *model, "data.eval.eval=generate", "data.eval.max_batches=0",
                    "data.eval.generation={max_new_tokens: 4, num_beams: 2, prompt_style: trainer}",
                    eval_batch_size=8, train_batch_size=8, context_length=16))
    _, evals = read_metrics(out)
    assert [e["step"] for e in evals] == [4]
    logged = evals[0]["eval"]
    assert {"CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "caption_token_acc"} <= set(logged) and logged["CIDEr"] >= 0.0
    assert scored[-1] == 48  # every held-out pair of the eval shard decoded

    # Evaluate-only on a copy of the run somewhere else: nothing is read from or written to its old out_dir.
    moved = tmp_path / "exported"
    shutil.move(out, moved)
    assert cli.main(["run", "--checkpoint", str(moved), "--data", f"{data}/eval-000000.tar", "--metric", "cider",
                     "--prompt-style", "trainer", "--max-new-tokens", "4", "--num-beams", "2", "--batch-size", "8",
                     "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"0"} and scored[-1] == 48
    assert not out.exists()
    # The rebuilt model decodes every held-out image as the trained one did, so the scores are the logged ones.
    assert _captions(moved / "eval" / "caption_0shot_seed42.json") == _captions(
        moved / "predictions" / "caption_0shot_seed0.json")
    for metric in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"):
        assert printed["0"][metric] == pytest.approx(logged[metric]), metric
    assert (moved / "eval" / "eval_cider.json").is_file()


@pytest.mark.slow  # a 2-step vlmcore-train run (DeepSpeed's CPU op build on a fresh machine)
def test_blip2_answers_questions_with_the_blip2_prompt(data, tmp_path):
    """BLIP-2's zero-shot VQA protocol on a rebuilt blip2_stage2 run: the frozen LM receives the query embeddings,
    then ``Question: {q} Short answer:`` (no ``<image>`` tag: the soft prompt replaces it); the answers are
    scored with the official VQA accuracy."""
    out = tmp_path / "blip2"
    main(train_argv("blip2_stage2", data, out, "max_steps=2", "save_every=2", TINY_LM, TINY_QFORMER,
                    "model.vision.freeze=true", eval_batch_size=None, train_batch_size=8, context_length=24))
    loaded = run.load_run(str(out), "cpu")
    blip2, tok = loaded.model.model, loaded.model.tok
    seen, generate = [], blip2.generate

    def recording(pixels, ids, **kwargs):
        seen.append(ids)
        return generate(pixels, ids, **kwargs)

    blip2.generate = recording
    questions = demo_eval.colour_questions(loaded.read(f"{data}/eval-000000.tar", "caption"))[:8]
    settings = fewshot.FewShotSettings(shots=(0,), num_samples=8, batch_size=8, max_new_tokens=3, num_beams=2,
                                       progress=False, style=TRAINER)
    results = fewshot.evaluate(loaded.model, "vqa", [], questions, settings)

    queries = [blip2.image_token_id] * blip2.qformer.num_query_tokens
    expected = queries + tok.encode(f" Question: {demo_eval.QUESTION} Short answer:")
    for row in seen[0].tolist():  # left-padded rows
        assert [t for t in row if t != tok.pad_token_id] == expected
    assert 0.0 <= results["0"]["accuracy"] <= 100.0
