"""The blip_vqa and blip_nlvr tasks in-process (one rank, DeepSpeed on gloo): VQAv2- and NLVR2-format
files (tiny coloured squares) -> vlmcore-convert -> shards -> a few training steps -> evaluation."""

from __future__ import annotations

import json
import tarfile

import pytest
from helpers.training import read_metrics, train_argv
from helpers.vqa_nlvr_files import square, write_nlvr2, write_vqav2
from vlmcore.train import main
from vlmcore.train.config import ConfigError
from vlmcore.train.data.pipeline import BadSample
from vlmcore.train.data.vqa_nlvr import answer_weights, nlvr_fields, vqa_fields
from vlmcore.train.tools.convert_vqa import console_main, convert_nlvr2, convert_vqav2

from vlmcore.eval.inputs import EvalInputError

TINY_TEXT = "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}"
SETTINGS = ("save_every=0", "optim.lr=2e-3", "optim.warmup_steps=2", "max_steps=4", "eval_every=4",
            "data.train.0.batch_size=8", "data.eval.max_batches=1", "tokenizer.context_length=12")


@pytest.fixture(scope="module")
def vqa_files(tmp_path_factory):
    """VQAv2's layout: questions + annotations JSON, COCO_train2014_<id>.jpg images."""
    return write_vqav2(tmp_path_factory.mktemp("vqav2"))


@pytest.fixture(scope="module")
def nlvr_files(tmp_path_factory):
    """NLVR2's layout: a jsonl of identifiers / sentences / labels, <id>-img0.png / -img1.png images."""
    return write_nlvr2(tmp_path_factory.mktemp("nlvr2"))


def test_vqav2_converter_writes_vqa_samples(vqa_files, tmp_path):
    summary = convert_vqav2(str(vqa_files / "q.json"), str(vqa_files / "a.json"), str(vqa_files / "images"),
                            str(tmp_path), split="train", answer_list_size=2, shard_size=10)
    assert summary["samples"] == 24 and len(summary["shards"]) == 3
    assert len(json.loads((tmp_path / "answer_list.json").read_text())) == 2
    with tarfile.open(summary["shards"][0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    sample = {"__key__": "100", **{name.split(".", 1)[1]: data for name, data in members.items()
                                   if name.startswith("100.")}}
    _, question, answers, weights = vqa_fields(sample)
    assert question == "what colour is the square"
    assert answers == ["red", "green"] and weights == pytest.approx([0.8, 0.2])


def test_nlvr2_converter_writes_left_and_right(nlvr_files, tmp_path):
    summary = convert_nlvr2(str(nlvr_files / "dev.json"), str(nlvr_files / "images"), str(tmp_path))
    with tarfile.open(summary["shards"][0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert {"dev-1-0-1.left.png", "dev-1-0-1.right.png", "dev-1-0-1.json"} <= set(members)
    sample = {"__key__": "dev-1-0-1", "left.png": members["dev-1-0-1.left.png"],
              "right.png": members["dev-1-0-1.right.png"], "json": members["dev-1-0-1.json"]}
    left, right, sentence, label = nlvr_fields(sample)
    assert (left, right, label) == (square("green", "PNG"), square("red", "PNG"), 1)


def test_converters_and_fields_refuse_bad_input(vqa_files, nlvr_files, tmp_path):
    with pytest.raises(EvalInputError, match="cannot read"):
        convert_vqav2(str(vqa_files / "q.json"), str(vqa_files / "a.json"), str(tmp_path), str(tmp_path / "o"))
    (tmp_path / "bad.json").write_text('{"identifier": "dev-1-0-1", "sentence": "x", "label": "yes"}\n')
    with pytest.raises(SystemExit, match="jsonl: line 1: label"):
        console_main(["nlvr2", "--jsonl", str(tmp_path / "bad.json"), "--images", str(nlvr_files / "images"),
                      "--out", str(tmp_path / "o")])
    with pytest.raises(BadSample, match="weights"):
        vqa_fields({"__key__": "k", "jpg": b"", "json": b'{"question": "q", "answers": ["a"], "weights": [1, 2]}'})
    with pytest.raises(BadSample, match="label"):
        nlvr_fields({"__key__": "k", "left.png": b"", "right.png": b"", "json": b'{"sentence": "s", "label": [1]}'})
    assert answer_weights(["a", "b"], [0.3, 1]) == (["a", "b"], [0.3, 1.0])


@pytest.fixture(scope="module")
def vqa_shards(vqa_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa_shards")
    for split in ("train", "val"):
        convert_vqav2(str(vqa_files / "q.json"), str(vqa_files / "a.json"), str(vqa_files / "images"), str(out),
                      split=split)
    return out


@pytest.mark.parametrize("inference", ["rank", "generate"])
def test_blip_vqa_trains_and_evaluates(data, vqa_shards, tmp_path, inference):
    result = main(train_argv("blip_vqa", data, tmp_path / "run", *SETTINGS, eval_shards=f"{vqa_shards}/val-000000.tar",
                             eval_batch_size=12, vision=None)
                  + [f"data.train.0.shards={vqa_shards}/train-000000.tar", f"model.blip_vqa.text={TINY_TEXT}",
                     f"model.blip_vqa.inference={inference}",
                     f"model.blip_vqa.answer_list={vqa_shards}/answer_list.json",
                     "model.blip_vqa.k_test=2", "model.blip_vqa.max_answers=3"])
    steps, evals = read_metrics(tmp_path / "run")
    assert len(steps) == 4 and all(s["loss"] > 0 for s in steps)
    assert result["eval_samples"] == 12 and 0.0 <= result["vqa_acc"] <= 1.0
    assert evals  # the evaluation was logged


def test_blip_nlvr_trains_and_evaluates(data, nlvr_files, tmp_path):
    shards = tmp_path / "shards"
    convert_nlvr2(str(nlvr_files / "dev.json"), str(nlvr_files / "images"), str(shards))
    result = main(train_argv("blip_nlvr", data, tmp_path / "run", *SETTINGS, eval_shards=f"{shards}/dev-000000.tar",
                             eval_batch_size=12, vision=None)
                  + [f"data.train.0.shards={shards}/dev-000000.tar", f"model.blip_nlvr.text={TINY_TEXT}"])
    steps, _ = read_metrics(tmp_path / "run")
    assert len(steps) == 4 and all(0.0 <= s["accuracy"] <= 1.0 for s in steps)
    assert result["eval_samples"] == 12 and 0.0 <= result["nlvr_acc"] <= 1.0


def test_configs_are_refused_with_the_key(data, vqa_shards, tmp_path):
    with pytest.raises(ConfigError, match="model.blip_vqa.answer_list"):
        main(train_argv("blip_vqa", data, tmp_path / "run", *SETTINGS, eval_shards=f"{vqa_shards}/val-000000.tar",
                        vision=None) + [f"data.train.0.shards={vqa_shards}/train-000000.tar",
                                        "model.blip_vqa.answer_list=''"])
    with pytest.raises(ConfigError, match="data.train: task 'blip_nlvr' trains on NLVR2 image pairs"):
        main(train_argv("blip_nlvr", data, tmp_path / "run2", *SETTINGS, eval_shards=f"{vqa_shards}/val-000000.tar",
                        vision=None)
             + [f"data.train.0.shards={vqa_shards}/train-000000.tar", "data.train.0.kind=vqa"])
