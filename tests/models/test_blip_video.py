"""BLIP zero-shot text <-> video retrieval (vlmcore.blip.video) against a plain re-statement of
salesforce/BLIP's ``eval_retrieval_video.py`` on the same tiny weights: ITC = normalize(mean over frames
of vision_proj(CLS)); ITM over the frames' tokens concatenated; ITC top-k re-ranked by ITM + ITC."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close
from helpers.tiny_blip import tiny_batch, tiny_blip

from vlmcore.blip import encode_video, video_retrieval_metrics, video_retrieval_scores

ATOL = RTOL = 1e-5  # fp32


def salesforce_video_scores(model, videos: list[torch.Tensor], ids, mask, k_test: int):
    """BLIP's ``evaluation`` (eval_retrieval_video.py) restated: ``videos`` is a list of ``[F_i, 3, H, W]``
    (each its own frame count, no padding). Returns ``(video_embeds, score_v2t, score_t2v)``."""
    itm_ids = ids.clone()
    itm_ids[:, 0] = model.config.enc_token_id  # text_ids[:, 0] = tokenizer.additional_special_tokens_ids[0]
    text_embeds = F.normalize(model.text_proj(model.text_encoder(ids, mask, mode="text")[:, 0]), dim=-1)
    video_feats, video_embeds = [], []
    for video in videos:
        feat = model.visual_encoder(video)  # [F, N, d]
        video_embeds.append(F.normalize(model.vision_proj(feat[:, 0]).mean(dim=0), dim=-1))
        video_feats.append(feat.reshape(-1, feat.shape[-1]))  # [F * N, d]
    video_embeds = torch.stack(video_embeds)
    sims = video_embeds @ text_embeds.T

    def itm(video: int, texts: torch.Tensor) -> torch.Tensor:
        out = model.text_encoder(itm_ids[texts], mask[texts], mode="multimodal",
                                 image_embeds=video_feats[video].expand(len(texts), -1, -1))
        return model.itm_head(out[:, 0])[:, 1]

    score_v2t = torch.full(sims.shape, -100.0)
    for i in range(sims.shape[0]):
        top_sim, top_idx = sims[i].topk(k_test)
        score_v2t[i, top_idx] = itm(i, top_idx) + top_sim
    score_t2v = torch.full(sims.T.shape, -100.0)
    for j in range(sims.shape[1]):
        top_sim, top_idx = sims[:, j].topk(k_test)
        score_t2v[j, top_idx] = torch.cat([itm(int(v), torch.tensor([j])) for v in top_idx]) + top_sim
    return video_embeds, score_v2t, score_t2v


def salesforce_itm_eval(score_v2t, score_t2v, txt2vid, vid2txt) -> dict:
    """BLIP's ``itm_eval`` (percentages, one positive per query, argsort ranks)."""
    def ranks(scores, positive):
        return np.array([np.where(np.argsort(s)[::-1] == positive[i])[0][0] for i, s in enumerate(scores)])

    tr, vr = ranks(score_v2t.numpy(), vid2txt), ranks(score_t2v.numpy(), txt2vid)
    return {"txt_r1": 100.0 * (tr < 1).mean(), "txt_r5": 100.0 * (tr < 5).mean(), "vid_r1": 100.0 * (vr < 1).mean(),
            "vid_r5": 100.0 * (vr < 5).mean(), "vid_mdR": np.median(vr + 1)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_blip().eval()


def _videos(n: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randn(n, frames, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_itc_features_and_reranked_scores_match_salesforce(model):
    frames = _videos(6, 3, seed=1)
    _, ids, mask = tiny_batch(b=6, seed=2)
    expected_embeds, expected_v2t, expected_t2v = salesforce_video_scores(model, list(frames), ids, mask, k_test=3)
    encoded = encode_video(model, frames)
    assert encoded.tokens.shape == (6, 3 * 5, 32) and encoded.token_mask is None  # 4 patches + CLS per frame
    assert_close(encoded.features, expected_embeds, atol=ATOL, rtol=RTOL, name="ITC video features")
    score_v2t, score_t2v = video_retrieval_scores(model, frames, ids, mask, k_test=3, batch_size=4)
    assert_close(score_v2t, expected_v2t, atol=ATOL, rtol=RTOL, name="v2t")
    assert_close(score_t2v, expected_t2v, atol=ATOL, rtol=RTOL, name="t2v")
    assert ((score_v2t > -100).sum(1) == 3).all() and ((score_t2v > -100).sum(1) == 3).all()
    on_device = video_retrieval_scores(model, frames, ids, mask, k_test=3, batch_size=4, tokens_on_cpu=False)
    assert torch.equal(on_device[0], score_v2t) and torch.equal(on_device[1], score_t2v)


@torch.no_grad()
def test_padded_frames_change_nothing(model):
    lengths = [3, 1, 4, 2, 4]
    real = [_videos(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    garbage = _videos(len(lengths), 4, seed=99) * 5
    frames = torch.stack([torch.cat([v, garbage[i, len(v):]]) for i, v in enumerate(real)])  # [5, 4, 3, 16, 16]
    frame_mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    _, ids, mask = tiny_batch(b=5, seed=4)
    expected_embeds, expected_v2t, expected_t2v = salesforce_video_scores(model, real, ids, mask, k_test=2)
    encoded = encode_video(model, frames, frame_mask)
    assert_close(encoded.features, expected_embeds, atol=ATOL, rtol=RTOL, name="masked ITC mean")
    assert torch.equal(encoded.token_mask, frame_mask.repeat_interleave(5, dim=1))
    score_v2t, score_t2v = video_retrieval_scores(model, frames, ids, mask, frame_mask, k_test=2, batch_size=2)
    assert_close(score_v2t, expected_v2t, atol=ATOL, rtol=RTOL, name="v2t padded")
    assert_close(score_t2v, expected_t2v, atol=ATOL, rtol=RTOL, name="t2v padded")
    # Without the mask the garbage frames do count: the mask is what makes the scores equal.
    unmasked = encode_video(model, frames).features
    assert not torch.allclose(unmasked[:2], expected_embeds[:2], atol=1e-3)


@torch.no_grad()
def test_one_frame_is_image_retrieval(model):
    images, ids, mask = tiny_batch(b=5, seed=5)
    expected = model.retrieval_scores(images, ids, mask, k_test=3, batch_size=2)
    got = video_retrieval_scores(model, images[:, None], ids, mask, torch.ones(5, 1, dtype=torch.bool), k_test=3,
                                 batch_size=2)
    assert_close(got[0], expected[0], atol=1e-6, rtol=1e-6, name="i2t")
    assert_close(got[1], expected[1], atol=1e-6, rtol=1e-6, name="t2i")


@torch.no_grad()
def test_metrics_equal_salesforce_itm_eval(model):
    frames = _videos(8, 2, seed=6)
    _, ids, mask = tiny_batch(b=8, seed=7)
    # k_test = every candidate: no -100 ties (BLIP's argsort breaks those by position, vlmcore pessimistically)
    score_v2t, score_t2v = video_retrieval_scores(model, frames, ids, mask, k_test=8)
    metrics = video_retrieval_metrics(score_v2t, score_t2v, ks=(1, 5))
    expected = salesforce_itm_eval(score_v2t, score_t2v, txt2vid=list(range(8)), vid2txt=list(range(8)))
    assert metrics["v2t_R@1"] == pytest.approx(expected["txt_r1"] / 100)
    assert metrics["v2t_R@5"] == pytest.approx(expected["txt_r5"] / 100)
    assert metrics["t2v_R@1"] == pytest.approx(expected["vid_r1"] / 100)
    assert metrics["t2v_R@5"] == pytest.approx(expected["vid_r5"] / 100)
    assert metrics["t2v_median_rank"] == pytest.approx(expected["vid_mdR"])
    assert metrics["mean_recall"] == pytest.approx(sum(metrics[k] for k in ("v2t_R@1", "v2t_R@5", "t2v_R@1",
                                                                           "t2v_R@5")) / 4)
    perfect = video_retrieval_metrics(torch.eye(3), torch.eye(3))
    assert perfect["t2v_R@1"] == perfect["v2t_R@10"] == 1.0 and perfect["t2v_mean_rank"] == 1.0
    # two captions of video 0, one of video 1: video 1 ranks second for its caption, its caption third
    two = video_retrieval_metrics(torch.tensor([[3.0, 2.0, 1.0], [0.0, 5.0, 0.0]]),
                                  torch.tensor([[3.0, 0.0], [5.0, 2.0], [2.0, 1.0]]), torch.tensor([0, 0, 1]))
    assert two["t2v_R@1"] == pytest.approx(2 / 3) and two["t2v_mean_rank"] == pytest.approx(4 / 3)
    assert two["v2t_R@1"] == 0.5 and two["v2t_median_rank"] == pytest.approx(2.0)


def test_bad_inputs_name_the_argument(model):
    frames = _videos(2, 3, seed=8)
    with pytest.raises(ValueError, match="frames must be"):
        encode_video(model, frames[0])
    with pytest.raises(ValueError, match="frame_mask must be a bool"):
        encode_video(model, frames, torch.ones(2, 3))
    with pytest.raises(ValueError, match="frame_mask must keep at least one frame"):
        encode_video(model, frames, torch.tensor([[True, False, False], [False, False, False]]))
    _, ids, mask = tiny_batch(b=2)
    with pytest.raises(ValueError, match="k_test"):
        video_retrieval_scores(model, frames, ids, mask, k_test=0)


# --------------------------------------------------------------------------- BLIP-2 (stage-1 Q-Former)

@pytest.fixture(scope="module")
def blip2():
    from vlmcore import VisionTransformer
    from vlmcore.blip2 import Blip2Stage1, QFormer

    torch.manual_seed(0)
    vision = VisionTransformer(image_size=16, patch_size=8, width=24, depth=1, heads=2)
    qformer = QFormer(24, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, num_query_tokens=4,
                      vocab_size=40, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0)
    return Blip2Stage1(qformer, vision, embed_dim=8, dec_token_id=39).eval()


def blip2_reference_scores(model, videos: list[torch.Tensor], ids, mask, k: int):
    """The recipe restated per video, unpadded: the frames' tokens concatenated ``[F_i * S, W]``, the
    Q-Former's ITC (max over queries) and ITM + ITC on each query's top k (LAVIS compute_sim_matrix)."""
    tokens = [model.vision_encoder(v).reshape(1, -1, 24) for v in videos]  # [1, F_i * S, W]
    query_feats = torch.cat([model.image_features(t) for t in tokens])  # [N_vid, Q, D]
    text_feats = model.text_features(ids, mask)
    itc = torch.einsum("vqd,td->vtq", query_feats, text_feats).amax(-1)

    def itm(video: int, text: int) -> torch.Tensor:
        return model.itm_logits(tokens[video], ids[text:text + 1], mask[text:text + 1])[0, 1]

    i2t = torch.full(itc.shape, -100.0)
    for v in range(itc.shape[0]):
        top_sim, top_idx = itc[v].topk(k)
        i2t[v, top_idx] = torch.stack([itm(v, int(t)) for t in top_idx]) + top_sim
    t2i = torch.full(itc.T.shape, -100.0)
    for t in range(itc.shape[1]):
        top_sim, top_idx = itc[:, t].topk(k)
        t2i[t, top_idx] = torch.stack([itm(int(v), t) for v in top_idx]) + top_sim
    return itc, i2t, t2i


@torch.no_grad()
def test_blip2_padded_video_scores_equal_the_unpadded_recipe(blip2):
    from vlmcore.blip2.video import encode_video as blip2_encode_video
    from vlmcore.blip2.video import video_retrieval_scores as blip2_video_scores

    lengths = [2, 3, 1, 3]
    real = [_videos(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    garbage = _videos(4, 3, seed=98) * 5
    frames = torch.stack([torch.cat([v, garbage[i, len(v):]]) for i, v in enumerate(real)])
    frame_mask = torch.arange(3)[None, :] < torch.tensor(lengths)[:, None]
    _, ids, mask = tiny_batch(b=5, seed=9)
    itc, i2t, t2i = blip2_reference_scores(blip2, real, ids, mask, k=3)
    got = blip2_video_scores(blip2, frames, ids, mask, frame_mask, k=3, batch_size=3)
    assert_close(got["itc"], itc, atol=ATOL, rtol=RTOL, name="BLIP-2 video ITC")
    assert_close(got["itm_i2t"], i2t, atol=ATOL, rtol=RTOL, name="BLIP-2 v2t")
    assert_close(got["itm_t2i"], t2i, atol=ATOL, rtol=RTOL, name="BLIP-2 t2v")
    tokens, token_mask = blip2_encode_video(blip2, frames, frame_mask)
    assert tokens.shape == (4, 3 * 5, 24) and torch.equal(token_mask, frame_mask.repeat_interleave(5, dim=1))
    metrics = video_retrieval_metrics(got["itm_i2t"], got["itm_t2i"], torch.tensor([0, 1, 2, 3, 0]))
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if "_R@" in k)


@torch.no_grad()
def test_blip2_one_frame_is_image_retrieval(blip2):
    from vlmcore.blip2.video import video_retrieval_scores as blip2_video_scores

    images, ids, mask = tiny_batch(b=4, seed=11)
    expected = blip2.retrieval_scores(blip2.vision_encoder(images), ids, mask, k=2, batch_size=2)
    got = blip2_video_scores(blip2, images[:, None], ids, mask, k=2, batch_size=2)
    for name in ("itc", "itm_i2t", "itm_t2i"):
        assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6, name=name)
