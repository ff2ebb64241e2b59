"""The few-shot protocol equals OpenFlamingo's ``evaluate.py``: the same samples, the same demonstrations
and byte-identical prompt strings, 0-shot and k-shot, for captioning and VQA; the same post-processing."""

import argparse
import importlib.util

import pytest
import torch
from helpers.openflamingo_eval import RecordingEvalModel, load_evaluate

from vlmcore.eval import fewshot, prompts
from vlmcore.eval.demos import distributed_order, plan_trial, prompt_images

# Not importorskip: importing the package itself needs its training dependencies (see the helper).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("open_flamingo") is None,
                                reason="open-flamingo==2.0.1 (pip install --no-deps) is the reference")

N_TRAIN, N_TEST = 40, 23


def caption_item(split, i):
    return {"image": f"{split}{i}", "caption": f" a caption number {i} ", "image_id": 1000 + i}


def vqa_item(split, i):
    return {"image": f"{split}{i}", "question": f"what is {i}?", "answers": [f"answer {i}", "other"],
            "question_id": 2000 + i}


class FakeDataset(torch.utils.data.Dataset):
    """Stands in for OpenFlamingo's CaptionDataset / VQADataset (same item keys; images are names)."""

    def __init__(self, item, is_train, **_):
        self.split = "train" if is_train else "test"
        self.item, self.n = item, N_TRAIN if is_train else N_TEST

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item(self.split, int(i))


@pytest.fixture
def evaluate(monkeypatch, tmp_path):
    ev = load_evaluate(monkeypatch)
    monkeypatch.chdir(tmp_path)  # evaluate.py writes its results file into the working directory
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 1)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 0)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(0, obj))
    monkeypatch.setattr(ev, "CaptionDataset", lambda **kw: FakeDataset(caption_item, **kw))
    monkeypatch.setattr(ev, "VQADataset", lambda **kw: FakeDataset(vqa_item, **kw))
    monkeypatch.setattr(ev, "compute_cider", lambda **kw: {"CIDEr": 0.0})
    monkeypatch.setattr(ev, "compute_vqa_accuracy", lambda *a: 0.0)
    return ev


def of_args(num_samples, query_set_size, batch_size):
    paths = {f"{p}_{s}": "x" for p in ("vqav2_train", "vqav2_test") for s in
             ("image_dir_path", "questions_json_path", "annotations_json_path")}
    return argparse.Namespace(
        coco_train_image_dir_path="x", coco_val_image_dir_path="x", coco_karpathy_json_path="x",
        coco_annotations_json_path="x", num_samples=num_samples, batch_size=batch_size, rices=False,
        query_set_size=query_set_size, model="open_flamingo", rank=0, world_size=1, **paths)


def ours(kind, num_shots, seed, num_samples, query_set_size, batch_size):
    """(prompts, images) of vlmcore's protocol over the same two sets, in visiting order."""
    if kind == "caption":
        train = [{"image": f"train{i}", "captions": [caption_item("train", i)["caption"]]} for i in range(N_TRAIN)]
        test = [{"image": f"test{i}", "captions": ["x"]} for i in range(N_TEST)]
    else:
        train = [{"image": f"train{i}", **vqa_item("train", i)} for i in range(N_TRAIN)]
        test = [{"image": f"test{i}", **vqa_item("test", i)} for i in range(N_TEST)]
    plan = plan_trial(N_TEST, N_TRAIN, seed=seed, num_samples=num_samples, query_set_size=query_set_size)
    k = prompts.effective_num_shots(num_shots)
    texts, images = [], []
    for start in range(0, len(plan.eval_indices), batch_size):
        batch = [test[i] for i in plan.eval_indices[start:start + batch_size]]
        demos = [[train[j] for j in plan.random_demos(k)] for _ in batch]
        texts += [fewshot.build_prompt(kind, row, q, num_shots) for row, q in zip(demos, batch)]
        images += prompt_images(demos, batch, num_shots)
    return texts, images


@pytest.mark.parametrize("num_shots", [0, 4])
@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_prompts_are_openflamingos_byte_for_byte(evaluate, kind, num_shots):
    seed, num_samples, query_set_size, batch_size = 7, 11, 16, 4
    model = RecordingEvalModel()
    run = evaluate.evaluate_captioning if kind == "caption" else evaluate.evaluate_vqa
    run(of_args(num_samples, query_set_size, batch_size), model, seed=seed, num_shots=num_shots,
        **({} if kind == "caption" else {"dataset_name": "vqav2"}))
    texts, images = ours(kind, num_shots, seed, num_samples, query_set_size, batch_size)
    assert len(model.texts) == num_samples
    assert [t.encode() for t in texts] == [t.encode() for t in model.texts]
    assert images == model.images  # same demonstrations, same query, same order


def test_zero_shot_convention_and_examples(evaluate):
    assert [prompts.effective_num_shots(s) for s in (0, 4, 32)] == [
        evaluate.utils.compute_effective_num_shots(s, "open_flamingo") for s in (0, 4, 32)] == [2, 4, 32]
    assert prompts.caption_few_shot_prompt(["a red circle", " a cross "], 0) == (
        "Output:a red circle<|endofchunk|>\nOutput:a cross<|endofchunk|>\n<image>Output:")
    assert prompts.vqa_few_shot_prompt([("What colour is the shape?", "red")], "What colour is the shape?", 1) == (
        "<image>Question:What colour is the shape? Short answer:red<|endofchunk|>\n"
        "<image>Question:What colour is the shape? Short answer:")
    assert prompts.hateful_memes_prompt("hi", "no") == (
        "<image>is an image with: 'hi' written on it. Is it hateful? Answer:no<|endofchunk|>")


@pytest.mark.parametrize("text", ["a red circle Output: a blue", 'a "quoted" cat', "plain", ""])
def test_caption_postprocessing_is_openflamingos(evaluate, text):
    assert prompts.postprocess_caption(text) == evaluate.postprocess_captioning_generation(text).replace('"', "")


@pytest.mark.parametrize("text", ["red Question: what", "blue, green", "yes Short answer: no", "two Answer", "x"])
def test_vqa_postprocessing_is_openflamingos(evaluate, text):
    assert prompts.postprocess_vqa(text) == evaluate.postprocess_vqa_generation(text)


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 4)])
def test_rank_order_is_distributed_samplers(n, world):
    data = list(range(n))
    for rank in range(world):
        sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=world, rank=rank)
        assert distributed_order(n, rank, world) == list(sampler)


def test_trial_seeds_draw_different_demos():
    a, b = (plan_trial(50, 100, seed=s, num_samples=10, query_set_size=20) for s in (1, 2))
    assert a.eval_indices != b.eval_indices or a.query_set != b.query_set
    with pytest.raises(ValueError, match="num_samples=60 exceeds"):
        plan_trial(50, 100, seed=0, num_samples=60)
    with pytest.raises(ValueError, match="cannot draw 8 demonstrations from a query set of 5"):
        plan_trial(50, 100, seed=0, query_set_size=5).random_demos(8)
