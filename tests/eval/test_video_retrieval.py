"""Zero-shot text <-> video retrieval evaluation (vlmcore.eval.video_retrieval) on video batches built
here: captions grouped per video, the numbers equal the model functions', deterministic, BLIP and
BLIP-2; mp4 clips written with PyAV go through the run's ``common.VideoDecoder`` and the task's
video encoder into it, and a corrupt video is counted as skipped (EvalTally, ``bad_video``)."""

import random

import pytest
import torch
from helpers.tiny_blip import tiny_batch, tiny_blip
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.eval_counts import EvalTally
from vlmcore.train.data.pipeline import BadSample
from vlmcore.train.data.preprocess import ImageTransform
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks.blip_retrieval import BlipVideoEncoder
from vlmcore.train.tasks.common import ImageDecoder, VideoDecoder

from vlmcore.blip import video_retrieval_scores
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
