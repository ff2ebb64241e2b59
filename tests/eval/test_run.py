"""A run with ``data.eval.eval: generate`` logs caption metrics to metrics.jsonl; its exported model is
rebuilt from the run directory and evaluated again by ``vlmcore-eval run`` (in-process), scored by
COCOEvalCap's own scorers (pycocoevalcap + Java)."""

import json

import pytest
from helpers.training import read_metrics, train_argv
from vlmcore.train import main
from vlmcore.train.config import ConfigError
from vlmcore.train.tools import demo_eval

from vlmcore.eval import cli, run

TINY_LM = ("model.lm={config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
           "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}}")


@pytest.fixture
def scorer(monkeypatch):
    """The real ``score_captions`` (COCOEvalCap's scorers), recording the predictions it is given."""
    from vlmcore.eval import captions

    seen, real = [], captions.score_captions

    def recording(predictions, references, *, spice=False):
        seen.append(predictions)
        return real(predictions, references, spice=spice)

    monkeypatch.setattr(captions, "score_captions", recording)
    return seen


@pytest.mark.slow
def test_generate_during_training_then_evaluate_the_exported_run(data, tmp_path, scorer, capsys, monkeypatch):
    out = tmp_path / "flamingo"
    main(train_argv("flamingo", data, out, "max_steps=6", "save_every=6", "eval_every=3", TINY_LM,
                    f"data.train.0.shards={data}/docs-*.tar", f"data.train.1.shards={data}/train-*.tar",
                    "data.train.0.batch_size=4", "data.train.1.batch_size=8", "tokenizer.context_length=32",
                    "data.eval.eval=generate", "data.eval.batch_size=8", "data.eval.max_batches=2",
                    "data.eval.generation={max_new_tokens: 4, num_beams: 2}"))
    _, evals = read_metrics(out)
    assert [e["step"] for e in evals] == [3, 6]
    for e in evals:
        assert {"CIDEr", "Bleu_4", "caption_token_acc"} <= set(e["eval"])
    assert len(scorer[-1]) == 16  # max_batches x batch_size held-out pairs decoded
    logged = evals[-1]["eval"]["CIDEr"]

    assert cli.main(["run", "--checkpoint", str(out), "--data", f"{data}/eval-000000.tar", "--metric", "cider",
                     "--num-samples", "16", "--max-new-tokens", "4", "--num-beams", "2", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"0"} and printed["0"]["CIDEr"] >= 0.0
    assert (out / "eval" / "eval_cider.json").is_file() and (out / "eval" / "caption_0shot_seed42.json").is_file()
    # The OpenFlamingo prompt and a random 16 of 48 samples differ from the training-time decode, so the
    # numbers need not be equal.
    assert logged >= 0.0

    # the demo's step on this run: 0 / 4 shots, captions and colour questions, with and without the images
    monkeypatch.setattr(demo_eval, "NUM_SAMPLES", 8)
    report = demo_eval.generation_report(str(tmp_path), str(data), str(out))
    assert set(report) == {f"flamingo_{b}{m}_{k}shot" for b in ("", "blind_") for m in ("cider", "vqa_acc")
                           for k in (0, 4)}
    assert json.loads((tmp_path / "generation_metrics.json").read_text()) == report


def test_generate_is_refused_for_a_task_that_does_not_generate(data, tmp_path):
    with pytest.raises(ConfigError, match="data.eval.eval: task 'clip' does not generate text"):
        main(train_argv("clip", data, tmp_path / "clip", "max_steps=1", "data.eval.eval=generate"))


def test_run_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        run.load_run(str(tmp_path))
    with pytest.raises(ValueError, match="shots > 0 and RICES need demonstrations"):
        run.run_from_checkpoint(str(tmp_path), "x.tar", "cider", shots=(4,))
