"""Zero-shot text <-> video retrieval evaluation (vlmcore.eval.video_retrieval) on video batches built
here: captions grouped per video, the numbers equal the model functions', deterministic, BLIP and
BLIP-2; mp4 clips written with PyAV go through the run's ``common.VideoDecoder`` and the task's
video encoder into it, and a corrupt video is counted as skipped (EvalTally, ``bad_video``); the
tie rule (pessimistic) against BLIP's ``itm_eval``; ``vlmcore-eval video-retrieval`` on tiny
blip_retrieval and blip2_stage1 runs trained here, and its errors (exit 2 naming the file)."""

import json
import random

import numpy as np
import pytest
import torch
from helpers.tiny_blip import tiny_batch, tiny_blip
from helpers.training import train_argv
from vlmcore.train import main as train_main
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.eval_counts import EvalTally
from vlmcore.train.data.pipeline import BadSample
from vlmcore.train.data.preprocess import ImageTransform
from vlmcore.train.data.tar_writer import TarWriter
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks.blip_retrieval import BlipVideoEncoder
from vlmcore.train.tasks.common import ImageDecoder, VideoDecoder

from vlmcore.blip import video_retrieval_scores
from vlmcore.eval import cli
from vlmcore.eval.video_retrieval import video_retrieval, videos_of_captions
from vlmcore.retrieval import video_retrieval_metrics

FRAMES = 3


def _batches(video_of_caption: list[int], lengths: list[int], seed: int, batch: int = 2) -> list[dict]:
    """Caption-level batches: caption i shows video ``video_of_caption[i]`` (its frames repeated per caption)."""
    g = torch.Generator().manual_seed(seed)
    videos = torch.randn(len(lengths), FRAMES, 3, 16, 16, generator=g)
    masks = torch.arange(FRAMES)[None, :] < torch.tensor(lengths)[:, None]
    _, ids, attention = tiny_batch(b=len(video_of_caption), seed=seed)
    vid = torch.tensor(video_of_caption)
    rows = {"frames": videos[vid], "frame_mask": masks[vid], "input_ids": ids, "attention_mask": attention,
            "video_ids": vid * 10 + 7}
    return [{k: v[i:i + batch] for k, v in rows.items()} for i in range(0, len(video_of_caption), batch)]


def test_videos_of_captions_numbers_videos_by_first_appearance():
    first, text_to_video = videos_of_captions(torch.tensor([40, 3, 40, 9, 3]))
    assert first.tolist() == [0, 1, 3] and text_to_video.tolist() == [0, 1, 0, 2, 1]


@torch.no_grad()
def test_metrics_group_captions_per_video_and_are_deterministic():
    torch.manual_seed(0)
    model = tiny_blip().eval()
    video_of_caption = [0, 1, 0, 2, 3, 2]
    batches = _batches(video_of_caption, lengths=[3, 2, 1, 3], seed=1)
    metrics = video_retrieval(model, batches, k_test=3, batch_size=2)
    assert metrics["eval_videos"] == 4 and metrics["eval_captions"] == 6
    recalls = {k: v for k, v in metrics.items() if "_R@" in k}
    assert len(recalls) == 6 and all(0.0 <= v <= 1.0 for v in recalls.values())
    assert 1.0 <= metrics["t2v_mean_rank"] <= 4.0 and 1.0 <= metrics["v2t_mean_rank"] <= 6.0
    assert video_retrieval(model, batches, k_test=3, batch_size=2) == metrics

    # the same numbers from the model functions on the distinct videos (first captions' rows 0, 1, 3, 4)
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    first = torch.tensor([0, 1, 3, 4])
    scores = video_retrieval_scores(model, whole["frames"][first], whole["input_ids"], whole["attention_mask"],
                                    whole["frame_mask"][first], k_test=3, batch_size=2)
    expected = video_retrieval_metrics(*scores, torch.tensor(video_of_caption))
    assert {k: metrics[k] for k in expected} == expected


@torch.no_grad()
def test_blip2_and_unknown_models():
    from vlmcore import VisionTransformer
    from vlmcore.blip2 import Blip2Stage1, QFormer

    torch.manual_seed(0)
    vision = VisionTransformer(image_size=16, patch_size=8, width=24, depth=1, heads=2)
    qformer = QFormer(24, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48, num_query_tokens=4,
                      vocab_size=40, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0)
    model = Blip2Stage1(qformer, vision, embed_dim=8, dec_token_id=39).eval()
    batches = _batches([0, 1, 2, 1], lengths=[1, 3, 2], seed=2)
    metrics = video_retrieval(model, batches, k_test=2)
    assert metrics["eval_videos"] == 3 and all(0.0 <= metrics[k] <= 1.0 for k in metrics if "_R@" in k)
    with pytest.raises(TypeError, match="BLIP or Blip2Stage1"):
        video_retrieval(torch.nn.Linear(2, 2), batches)
    with pytest.raises(ValueError, match="no batch"):
        video_retrieval(model, [])
    with pytest.raises(ValueError, match="lacks \\['video_ids'\\]"):
        video_retrieval(model, [{k: v for k, v in batches[0].items() if k != "video_ids"}])


def _mp4_samples() -> list[dict]:
    """Five moving-shape clips written as mp4 with PyAV (2 to 4 frames), and one corrupt mp4 in the middle."""
    from vlmcore.train.tools.shape_drawing import moving_shape
    from vlmcore.train.tools.video_shapes import encode_video

    rng = random.Random(3)
    samples = []
    for i, (shape, colour) in enumerate([("circle", "red"), ("square", "blue"), ("circle", "green"),
                                         ("square", "red"), ("circle", "blue")]):
        frames = moving_shape(rng, shape, colour, "right", "eval", 32, 2 + i % 3)
        samples.append({"__key__": f"clip{i}", "__url__": "eval.tar", "mp4": encode_video(frames),
                        "txt": f"a {colour} {shape}\nunused second line".encode()})
    broken = samples[1]["mp4"]
    samples.insert(2, {"__key__": "broken", "__url__": "eval.tar", "mp4": broken[: len(broken) // 3],
                       "txt": b"a blue square"})
    return samples


@torch.no_grad()
def test_mp4_eval_set_through_the_video_decoder_counts_corrupt_videos(data):
    pytest.importorskip("av")
    text = BlipText(Tokenizer(str(data / "tokenizer.json"), 16))
    tally = EvalTally()
    frames = VideoDecoder(ImageDecoder(ImageTransform(size=16, is_train=False), seed=0), 4, train=False)
    encoder = tally.wrap(BlipVideoEncoder(text, frames))

    def encoded() -> list[dict]:
        examples = []
        for sample in _mp4_samples():
            try:
                examples.append(encoder(sample))
            except BadSample:
                continue
        return examples

    examples = encoded()
    summary = tally.summary(["eval.tar"])
    assert summary == {"eval_usable_samples": 5, "eval_skipped_samples": 1, "eval_skipped/bad_video": 1}
    assert [e["frame_mask"].sum().item() for e in examples] == [2, 3, 4, 2, 3]  # padded to 4 frames
    assert examples[0]["frames"].shape == (4, 3, 16, 16) and examples[0]["input_ids"].shape == (16,)
    assert len({int(e["video_ids"]) for e in examples}) == 5  # no video_id in JSON: one video per key
    torch.manual_seed(0)
    model = tiny_blip().eval()
    model.text_encoder.embeddings.word_embeddings = torch.nn.Embedding(text.vocab_size, 32)  # the tokenizer's ids

    def metrics(examples):
        return video_retrieval(model, [{k: torch.stack([e[k] for e in examples]) for k in examples[0]}], k_test=4)

    first = metrics(examples)
    assert first["eval_videos"] == 5 and all(0.0 <= first[k] <= 1.0 for k in first if "_R@" in k)
    assert metrics(encoded()) == first  # decoding and scoring again: the same numbers


def _blip_itm_eval_ranks(scores: np.ndarray, positives: list[list[int]]) -> np.ndarray:
    """salesforce BLIP ``eval_retrieval_video.itm_eval``'s ranks: a candidate's position in ``np.argsort``
    descending, the best of the query's correct answers (ties: whatever order the sort leaves)."""
    ranks = np.zeros(len(scores), dtype=np.int64)
    for query, row in enumerate(scores):
        order = np.argsort(row)[::-1]
        ranks[query] = min(np.where(order == c)[0][0] for c in positives[query])
    return ranks


def test_ties_rank_pessimistically_and_untied_ranks_are_blips():
    text_to_video = torch.tensor([0, 1, 2, 0])
    # tie-free scores: exactly BLIP's argsort ranks (its median rank is vid_mdR = median(rank + 1))
    g = torch.Generator().manual_seed(4)
    v2t, t2v = torch.randn(3, 4, generator=g), torch.randn(4, 3, generator=g)
    metrics = video_retrieval_metrics(v2t, t2v, text_to_video, ks=(1, 2, 3))
    v2t_blip = _blip_itm_eval_ranks(v2t.numpy(), [[0, 3], [1], [2]])
    t2v_blip = _blip_itm_eval_ranks(t2v.numpy(), [[0], [1], [2], [0]])
    assert metrics["v2t_mean_rank"] == pytest.approx(v2t_blip.mean() + 1)
    assert metrics["t2v_mean_rank"] == pytest.approx(t2v_blip.mean() + 1)
    assert metrics["t2v_median_rank"] == pytest.approx(float(np.median(t2v_blip + 1)))
    assert metrics["t2v_R@1"] == pytest.approx(float((t2v_blip < 1).mean()))

    # a tie ranks the correct answer after every equal-scoring wrong one, whatever their positions
    tied = torch.zeros(4, 3)
    tied_metrics = video_retrieval_metrics(tied.T.clone(), tied, text_to_video, ks=(1, 2, 3))
    assert tied_metrics["t2v_R@1"] == 0.0 and tied_metrics["t2v_R@2"] == 0.0 and tied_metrics["t2v_R@3"] == 1.0
    # 1-based: a caption has 2 wrong videos -> 3; video 0 has 2 wrong captions -> 3, videos 1 and 2 have 3 -> 4
    assert tied_metrics["t2v_mean_rank"] == 3.0 and tied_metrics["v2t_mean_rank"] == pytest.approx(11 / 3)
    # the re-ranker's -100 for candidates outside the ITC top k_test: caption 1's video (1) ties there with
    # another video and ranks after it, whether that one comes before or after it in the row (an argsort
    # by position would rank it second in one layout and third in the other)
    for row in ([-100.0, -100.0, 7.0], [7.0, -100.0, -100.0]):
        outside = torch.tensor([[2.0, 1.0, 0.0], row, [0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
        out = video_retrieval_metrics(outside.T.clone(), outside, text_to_video, ks=(1, 3))
        assert out["t2v_R@1"] == 0.75 and out["t2v_R@3"] == 1.0
        assert out["t2v_mean_rank"] == pytest.approx((1 + 3 + 1 + 1) / 4) and out["t2v_median_rank"] == 1.0


TINY_TEXT = "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}"


@pytest.fixture(scope="module")
def retrieval_run(data, tmp_path_factory):
    """A blip_retrieval run of 2 steps on the shapes pairs (its out_dir: a BLIP checkpoint + config.json)."""
    out = tmp_path_factory.mktemp("video_eval") / "run"
    train_main(train_argv("blip_retrieval", data, out, "max_steps=2", "save_every=0", "optim.warmup_steps=1",
                          f"model.blip_retrieval.text={TINY_TEXT}", "model.blip_retrieval.embed_dim=16",
                          "model.blip_retrieval.queue_size=16", "model.blip_retrieval.k_test=4",
                          eval_batch_size=None, train_batch_size=8, context_length=12))
    return out


def _cli(capsys, *argv) -> tuple[int, dict | None, str]:
    """``vlmcore-eval`` in-process: (exit status, the JSON of stdout's last line or None, stderr)."""
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return status, json.loads(lines[-1]) if lines else None, captured.err


def test_video_retrieval_command_on_a_trained_run(retrieval_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("av")
    monkeypatch.setenv("VLMCORE_BACKEND", "reference")  # the kernels are covered by their own tests
    shard = tmp_path / "videos-000000.tar"
    with TarWriter(str(shard)) as tar:
        for sample in _mp4_samples():
            tar.write_sample(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
    argv = ("video-retrieval", "--run", str(retrieval_run), "--data", str(shard), "--frames", "4", "--k-test", "3",
            "--batch-size", "2", "--device", "cpu")
    status, result, _ = _cli(capsys, *argv)
    assert status == 0
    assert {f"{d}_R@{k}" for d in ("t2v", "v2t") for k in (1, 5, 10)} <= set(result)
    assert all(0.0 <= result[k] <= 1.0 for k in result if "_R@" in k)
    assert result["t2v_R@10"] == 1.0 and result["v2t_R@10"] == 1.0  # 5 videos: every answer is in the top 10
    assert 1.0 <= result["t2v_median_rank"] <= 5.0
    assert {k: result[k] for k in ("eval_videos", "eval_captions", "eval_usable_samples", "eval_skipped_samples",
                                   "eval_skipped/bad_video", "frames", "k_test")} == {
        "eval_videos": 5, "eval_captions": 5, "eval_usable_samples": 5, "eval_skipped_samples": 1,
        "eval_skipped/bad_video": 1, "frames": 4, "k_test": 3}
    assert _cli(capsys, *argv)[1] == result  # decoding, loading and scoring again: the same numbers

    # the first 3 usable clips: the broken one (third in the shard) is read and counted on the way
    status, first3, _ = _cli(capsys, *argv, "--max-videos", "3")
    assert status == 0 and first3["eval_videos"] == 3 and first3["eval_skipped/bad_video"] == 1

    missing = tmp_path / "missing-000000.tar"
    status, printed, err = _cli(capsys, *argv[:3], "--data", str(missing))
    assert status == 2 and printed is None
    assert err.strip().splitlines()[-1].startswith(f"vlmcore-eval: error: {missing}: ")


@pytest.fixture(scope="module")
def blip2_stage1_run(data, tmp_path_factory):
    """A blip2_stage1 run of 2 steps on the shapes pairs (its out_dir: config.json + trainable.safetensors)."""
    out = tmp_path_factory.mktemp("video_eval_blip2") / "run"
    train_main(train_argv("blip2_stage1", data, out, "max_steps=2", "save_every=0", "optim.warmup_steps=1",
                          "model.vision={image_size: 16, patch_size: 8, width: 32, depth: 1, heads: 2, freeze: true}",
                          "model.blip2_stage1.qformer={hidden_size: 32, num_layers: 2, num_heads: 2, "
                          "intermediate_size: 64, num_query_tokens: 4, max_position_embeddings: 16}",
                          "model.blip2_stage1.embed_dim=16", eval_batch_size=None, train_batch_size=8,
                          context_length=12, vision=None))
    return out


def test_video_retrieval_command_on_a_blip2_stage1_run(blip2_stage1_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("av")
    monkeypatch.setenv("VLMCORE_BACKEND", "reference")
    shard = tmp_path / "videos-000000.tar"
    with TarWriter(str(shard)) as tar:
        for sample in _mp4_samples():
            tar.write_sample(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
    argv = ("video-retrieval", "--run", str(blip2_stage1_run), "--data", str(shard), "--frames", "4", "--k-test", "3",
            "--batch-size", "2", "--device", "cpu")
    status, result, _ = _cli(capsys, *argv)
    assert status == 0
    assert all(0.0 <= result[k] <= 1.0 for k in result if "_R@" in k) and result["t2v_R@10"] == 1.0
    assert {k: result[k] for k in ("eval_videos", "eval_captions", "eval_usable_samples", "eval_skipped_samples",
                                   "eval_skipped/bad_video", "frames", "k_test")} == {
        "eval_videos": 5, "eval_captions": 5, "eval_usable_samples": 5, "eval_skipped_samples": 1,
        "eval_skipped/bad_video": 1, "frames": 4, "k_test": 3}
    assert _cli(capsys, *argv)[1] == result  # loading and scoring again: the same numbers

    # the numbers are the model's: the run's captions ([CLS] text <eos>, the training layout) scored directly
    from vlmcore.train.tasks.run_loader import build_run_model, video_batches

    task, model = build_run_model(str(blip2_stage1_run))
    batches, counts = video_batches(task, str(shard), 4, 2, 0)
    first = batches[0]
    assert first["input_ids"][0, 0] == task.text.cls_token_id == task.tok.vocab_size
    assert first["input_ids"][0].tolist() == task.text.encode(["a red circle"])[0][0].tolist()
    expected = video_retrieval(model.eval(), batches, k_test=3, batch_size=2)
    assert {k: result[k] for k in expected} == expected and counts["eval_skipped/bad_video"] == 1


def test_video_retrieval_command_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    status, printed, err = _cli(capsys, "video-retrieval", "--run", str(tmp_path), "--data", "x.tar")
    assert status == 2 and printed is None
    assert err.strip().splitlines() == [f"vlmcore-eval: error: {tmp_path}: {tmp_path} is not a run directory: it "
                                        "has no config.json"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["video-retrieval", "--run", str(tmp_path), "--data", "x.tar", "--frames", "0"])
    assert exit_.value.code == 2 and "argument --frames: must be >= 1, got 0" in capsys.readouterr().err
