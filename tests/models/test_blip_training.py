"""BLIP's training pieces: momentum encoders, queues, temperature clamp, the fused ITC in the model,
hard-negative sampling (never a positive, no host sync), the pre-training forward/backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close
from helpers.tiny_blip import tiny_batch, tiny_blip
from vlmcore.kernels import backend
from vlmcore.kernels.reference import momentum_contrastive_loss_reference

from vlmcore.blip import alpha_ramp, sample_hard_negatives


@contextlib.contextmanager
def host_syncs_raise(monkeypatch):
    """Make every tensor -> host read (``item``, ``cpu``, ``tolist``, ``numpy``, ``bool``/``int``/``float``) raise."""
    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    with monkeypatch.context() as patch:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse)
        yield


def test_hard_negatives_are_never_positive_and_follow_the_weights():
    b = 6
    sim = torch.randn(b, b) * 3
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    positive = ids[:, None] == ids[None, :]
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(b, b)
    for _ in range(3000):
        index, valid = sample_hard_negatives(sim, positive, generator=g)
        assert valid.all()
        assert not positive[torch.arange(b), index].any()
        counts[torch.arange(b), index] += 1
    weights = (torch.softmax(sim, 1) + 1e-4).masked_fill(positive, 0)
    expected = weights / weights.sum(1, keepdim=True)
    assert_close(counts / 3000, expected, atol=0.04, rtol=0.0, name="sampling frequencies")


def test_hard_negatives_flag_rows_without_a_negative():
    positive = torch.tensor([[True, True], [False, True]])
    _, valid = sample_hard_negatives(torch.zeros(2, 2), positive)
    assert valid.tolist() == [False, True]


def test_itm_sampling_path_makes_no_host_sync(monkeypatch):
    model = tiny_blip()
    images, ids, mask = tiny_batch()
    with torch.no_grad():
        embeds = model.encode_image(images)
        image_feat, text_feat = model.image_features(embeds), model.text_features(ids, mask)
    image_ids = torch.tensor([5, 5, 7, 8])
    with host_syncs_raise(monkeypatch), backend("reference"):
        index, valid = sample_hard_negatives(image_feat @ text_feat.T, torch.eye(4, dtype=torch.bool))
        loss, _ = model.itm_loss(embeds, ids, mask, image_feat, text_feat, image_ids=image_ids)
    assert torch.isfinite(loss)
    with host_syncs_raise(monkeypatch), pytest.raises(AssertionError, match="host sync"):
        loss.item()  # the patch is live: the check above can fail


def test_momentum_update_and_queue_wraparound():
    model = tiny_blip(queue_size=6, momentum=0.9)
    with torch.no_grad():
        for p in model.text_proj.parameters():
            p.add_(1.0)
    before = model.text_proj_m.weight.clone()
    model.momentum_update()
    assert_close(model.text_proj_m.weight, 0.9 * before + 0.1 * model.text_proj.weight, atol=1e-6, rtol=1e-6)
    feats = [F.normalize(torch.randn(4, 16), dim=1) for _ in range(2)]
    assert model.idx_queue.tolist() == [-100] * 6  # an empty queue's ids match no sample
    model.enqueue(feats[0], feats[0].flip(0), image_ids=torch.tensor([10, 11, 12, 13]))
    model.enqueue(feats[1], feats[1].flip(0))  # 8 rows into 6 slots: wraps; no ids -> -100
    assert model.queue_ptr.tolist() == [2]
    assert model.idx_queue.tolist() == [-100, -100, 12, 13, -100, -100]
    assert_close(model.image_queue[:2], feats[1][2:], atol=0, rtol=0)
    assert_close(model.image_queue[2:4], feats[0][2:], atol=0, rtol=0)
    assert_close(model.image_queue[4:], feats[1][:2], atol=0, rtol=0)
    with pytest.raises(ValueError, match="queue_size"):
        model.enqueue(torch.randn(7, 16), torch.randn(7, 16))


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_forward_itc_is_momentum_distilled_itc_on_the_queue(path):
    torch.manual_seed(0)
    model = tiny_blip(queue_size=8, momentum=0.9).train()
    images, ids, mask = tiny_batch()
    queue_before = (model.image_queue.clone(), model.text_queue.clone())
    with torch.no_grad():
        model.temp.fill_(0.9)  # out of range: forward clamps to 0.5
    with backend(path):
        out = model(images, ids, mask, alpha=0.3, losses=("itc",))
    assert float(model.temp.detach()) == pytest.approx(0.5)
    with torch.no_grad():
        embeds = model.encode_image(images)
        image_feat, text_feat = model.image_features(embeds), model.text_features(ids, mask)
        image_m, text_m = model.momentum_features(images, ids, mask)  # already updated by the forward
        expected = momentum_contrastive_loss_reference(
            image_feat, text_feat, image_m, text_m, torch.cat([image_m, queue_before[0]]),
            torch.cat([text_m, queue_before[1]]), model.temp, 0.3)
    assert_close(out["itc"], expected, atol=2e-5, rtol=2e-5, name="itc")
    assert_close(model.image_queue[:4], image_m, atol=1e-6, rtol=1e-6, name="enqueued")


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_forward_itc_with_image_ids_scores_same_image_entries_as_positives(path):
    """BLIP retrieval's ITC: with image ids, batch and queue entries of the same image are positives
    (targets spread over them), and the ids are enqueued with the features."""
    torch.manual_seed(0)
    model = tiny_blip(queue_size=8, momentum=0.9).train()
    images, ids, mask = tiny_batch()
    image_ids = torch.tensor([7, 3, 7, 5])  # rows 0 and 2 show the same image
    with backend(path):
        model(images, ids, mask, alpha=0.3, losses=("itc",), image_ids=image_ids)
    assert model.idx_queue[:4].tolist() == [7, 3, 7, 5] and model.idx_queue[4:].tolist() == [-100] * 4
    queue_before = (model.image_queue.clone(), model.text_queue.clone(), model.idx_queue.clone())
    with backend(path):
        out = model(images, ids, mask, alpha=0.3, losses=("itc",), image_ids=image_ids)
    with torch.no_grad():
        embeds = model.encode_image(images)
        image_feat, text_feat = model.image_features(embeds), model.text_features(ids, mask)
        image_m, text_m = model.momentum_features(images, ids, mask)
        columns = (torch.cat([image_m, queue_before[0]]), torch.cat([text_m, queue_before[1]]))
        column_ids = torch.cat([image_ids, queue_before[2]])
        expected = momentum_contrastive_loss_reference(image_feat, text_feat, image_m, text_m, *columns, model.temp,
                                                       0.3, ids=image_ids, column_ids=column_ids)
        one_hot = momentum_contrastive_loss_reference(image_feat, text_feat, image_m, text_m, *columns, model.temp,
                                                      0.3)
    assert_close(out["itc"], expected, atol=2e-5, rtol=2e-5, name="itc with image ids")
    assert abs(float(expected) - float(one_hot)) > 1e-4  # the ids changed the targets (near-uniform logits: small)


def test_pretrain_step_backpropagates_to_every_trained_part():
    model = tiny_blip().train()
    images, ids, mask = tiny_batch()
    out = model(images, ids, mask, alpha=alpha_ramp(3, 10), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "itc", "itm", "lm", "itm_acc"}
    out["loss"].backward()
    for name in ("temp", "vision_proj.weight", "text_proj.weight", "itm_head.weight",
                 "text_encoder.encoder.layer.0.attention.self.query.weight",
                 "text_encoder.encoder.layer.0.decoder_attention.self.query.weight",
                 "text_encoder.encoder.layer.1.crossattention.self.key.weight",
                 "lm_head.predictions.transform.dense.weight", "visual_encoder.conv1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("text_encoder_m."))


def test_alpha_ramp_and_bad_arguments():
    assert alpha_ramp(0, 10) == 0.0
    assert alpha_ramp(5, 10) == pytest.approx(0.2)
    assert alpha_ramp(50, 10) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="ramp_steps"):
        alpha_ramp(1, 0)
    with pytest.raises(ValueError, match="momentum"):
        tiny_blip(momentum=1.0)
    with pytest.raises(ValueError, match="queue_size"):
        tiny_blip(queue_size=-1)
    with pytest.raises(ValueError, match="temperature"):
        tiny_blip(temperature=0.9)
    model = tiny_blip(momentum=None)
    images, ids, mask = tiny_batch()
    with pytest.raises(ValueError, match="momentum"):
        model(images, ids, mask)
    with pytest.raises(ValueError, match="losses"):
        model(images, ids, mask, losses=("itx",))
    assert set(model(images, ids, mask, losses=("itm", "lm"))) == {"loss", "itm", "lm", "itm_acc"}


def test_retrieval_scores_rerank_the_itc_top_k_with_itm():
    from vlmcore.blip import blip_retrieval_metrics

    model = tiny_blip().eval()
    images, ids, mask = tiny_batch(b=5, seed=3)
    with torch.no_grad():
        score_i2t, score_t2i = model.retrieval_scores(images, ids, mask, k_test=2, batch_size=2)
        embeds = model.encode_image(images)
        sim = model.image_features(embeds) @ model.text_features(ids, mask).T
        for i in range(5):
            top = sim[i].topk(2).indices
            itm = model.itm_logits(embeds[i].expand(2, -1, -1), ids[top], mask[top])[:, 1]
            assert_close(score_i2t[i, top], itm + sim[i, top], atol=1e-5, rtol=1e-5, name="reranked")
            others = torch.ones(5, dtype=torch.bool)
            others[top] = False
            assert (score_i2t[i, others] == -100).all()
        assert (score_t2i > -100).sum(1).tolist() == [2] * 5
    metrics = blip_retrieval_metrics(score_i2t, score_t2i)
    assert set(metrics) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall"}
    assert metrics["i2t_R@5"] == 1.0  # 5 candidates
    perfect = torch.eye(5) * 10
    assert blip_retrieval_metrics(perfect, perfect)["i2t_R@1"] == 1.0
