"""Zero-shot text <-> video retrieval evaluation (vlmcore.eval.video_retrieval) on video batches built
here: captions grouped per video, the numbers equal the model functions', deterministic, BLIP and
BLIP-2; the task's video encoder feeds it and unusable videos are counted as skipped (EvalTally).

The frames come from a stand-in decoder (``KEY.npy`` float frames): decoding mp4 with PyAV is the
``video`` branch's ``common.VideoDecoder``, which the encoder takes as its ``video`` argument."""

import io

import numpy as np
import pytest
import torch
from helpers.tiny_blip import tiny_batch, tiny_blip
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.eval_counts import EvalTally
from vlmcore.train.data.pipeline import BadSample
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks.blip_retrieval import BlipVideoEncoder

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


def _npy_frames(sample: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Stand-in for common.VideoDecoder: frames ``[F, 3, 16, 16]`` stored as ``KEY.npy``, zero-padded to F."""
    try:
        frames = torch.from_numpy(np.load(io.BytesIO(sample["npy"])))
    except ValueError as e:
        raise BadSample(f"{sample['__key__']}.npy: {e}", "undecodable_image") from None
    out = torch.zeros(FRAMES, 3, 16, 16)
    out[:len(frames)] = frames
    return out, torch.arange(FRAMES) < len(frames), sample["txt"].decode("utf-8")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@torch.no_grad()
def test_video_encoder_feeds_the_eval_and_corrupt_videos_are_counted(data):
    text = BlipText(Tokenizer(str(data / "tokenizer.json"), 16))
    tally = EvalTally()
    encoder = tally.wrap(BlipVideoEncoder(text, _npy_frames))
    rng = np.random.default_rng(3)
    samples = [{"__key__": f"clip{i}", "__url__": "eval.tar", "txt": b"a red circle\nunused second line",
                "npy": _npy(rng.standard_normal((1 + i % FRAMES, 3, 16, 16)).astype(np.float32))} for i in range(5)]
    samples.insert(2, {"__key__": "broken", "__url__": "eval.tar", "txt": b"a blue square", "npy": b"not an array"})
    examples = []
    for sample in samples:
        try:
            examples.append(encoder(sample))
        except BadSample:
            continue
    summary = tally.summary(["eval.tar"])
    assert summary == {"eval_usable_samples": 5, "eval_skipped_samples": 1, "eval_skipped/undecodable_image": 1}
    assert examples[1]["frame_mask"].tolist() == [True, True, False]
    assert examples[0]["input_ids"].shape == (16,) and examples[0]["video_ids"].dtype == torch.long
    assert examples[0]["video_ids"] != examples[1]["video_ids"]  # no video_id in JSON: one video per key
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    torch.manual_seed(0)
    model = tiny_blip().eval()
    model.text_encoder.embeddings.word_embeddings = torch.nn.Embedding(text.vocab_size, 32)  # the tokenizer's ids
    metrics = video_retrieval(model, [batch], k_test=4)
    assert metrics["eval_videos"] == 5 and all(0.0 <= metrics[k] <= 1.0 for k in metrics if "_R@" in k)
