"""ViLBERT / VL-BERT: the co-attention layer against a plain-PyTorch reference with the same weights
(outputs and gradients, Triton interpreter and reference paths), whole-model forward/backward, the
pre-training corruptions and losses against hand-computed values, and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import vlmcore.kernels as K
from helpers.numerics import assert_close

from vlmcore.vilbert import (
    VLBERT,
    CoAttentionLayer,
    ViLBERT,
    ViLBERTConfig,
    box_iou,
    mask_regions,
    mask_tokens,
    masked_region_classification,
    masked_region_kl,
    mismatch_captions,
    mlm_loss,
    vilbert_pretraining_loss,
)


def tiny_config(**overrides) -> ViLBERTConfig:
    sizes = dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=40, v_feature_size=24, v_hidden_size=32, v_num_hidden_layers=2,
                 v_num_attention_heads=2, v_intermediate_size=40, bi_hidden_size=32, bi_num_attention_heads=2,
                 v_biattention_id=[0, 1], t_biattention_id=[1, 2], v_target_size=7, max_regions=12,
                 hidden_dropout_prob=0.0)
    sizes.update(overrides)
    return ViLBERTConfig(**sizes)


def _plain_attention(q, k, v, key_mask, heads):
    """softmax(q k^T / sqrt(dh)) v with padding keys excluded; a query with no key gets zeros."""
    b, lq, w = q.shape
    dh = w // heads
    q, k, v = (t.view(b, -1, heads, dh).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / dh**0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return (probs @ v).transpose(1, 2).reshape(b, lq, w)


def _plain_co_attention(layer: CoAttentionLayer, visual, visual_mask, text, text_mask):
    """The co-attention layer written out with the layer's own weights and no fused op."""
    h = layer.heads
    v_ctx = _plain_attention(layer.v_query(visual), layer.t_key(text), layer.t_value(text), text_mask, h)
    t_ctx = _plain_attention(layer.t_query(text), layer.v_key(visual), layer.v_value(visual), visual_mask, h)
    visual = layer.v_attn_norm(visual + layer.v_attn_output(v_ctx))
    text = layer.t_attn_norm(text + layer.t_attn_output(t_ctx))

    def ffn(f, x):
        return f.norm(x + f.output(F.gelu(f.intermediate(x))))

    return ffn(layer.v_ffn, visual), ffn(layer.t_ffn, text)


def _co_inputs(regions: int, length: int):
    visual = torch.randn(3, regions, 32, requires_grad=True)
    text = torch.randn(3, length, 24, requires_grad=True)
    visual_mask = torch.ones(3, regions, dtype=torch.bool)
    visual_mask[1, regions - 3:] = False   # padded regions
    visual_mask[2] = False                 # a sample whose regions are all padding
    text_mask = torch.ones(3, length, dtype=torch.bool)
    text_mask[0, length - 2:] = False
    return visual, visual_mask, text, text_mask


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_co_attention_matches_plain_reference(backend, nan_poisoned_empty):
    torch.manual_seed(0)
    layer = CoAttentionLayer(v_width=32, t_width=24, bi_width=32, bi_heads=2, v_intermediate=40, t_intermediate=36,
                             dropout=0.0, eps=1e-12)
    visual, visual_mask, text, text_mask = _co_inputs(regions=7, length=5)
    with K.backend(backend):
        v_out, t_out = layer(visual, visual_mask, text, text_mask)
    grads_v = torch.randn_like(v_out)
    grads_t = torch.randn_like(t_out)
    params = [visual, text, *layer.parameters()]
    got = torch.autograd.grad((v_out * grads_v).sum() + (t_out * grads_t).sum(), params)
    v_ref, t_ref = _plain_co_attention(layer, visual, visual_mask, text, text_mask)
    want = torch.autograd.grad((v_ref * grads_v).sum() + (t_ref * grads_t).sum(), params)
    assert_close(v_out, v_ref, name="visual")
    assert_close(t_out, t_ref, name="text")
    assert torch.isfinite(t_out).all()
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, grad=True, name=f"grad {i}")


def test_all_padding_regions_give_zero_context():
    """Text queries of a sample with no real region read nothing: the layer equals a zero context."""
    torch.manual_seed(1)
    layer = CoAttentionLayer(32, 24, 32, 2, 40, 36, dropout=0.0, eps=1e-12)
    visual, visual_mask, text, text_mask = _co_inputs(regions=5, length=4)
    with K.backend("triton"):
        _, t_out = layer(visual, visual_mask, text, text_mask)
    zero_context = layer.t_attn_norm(text[2] + layer.t_attn_output.bias)
    expected = layer.t_ffn.norm(zero_context + layer.t_ffn.output(F.gelu(layer.t_ffn.intermediate(zero_context))))
    assert_close(t_out[2], expected, name="text of the all-padding sample")


def _region_inputs(batch=2, regions=6, length=5, vocab=50, features=24):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    feats = torch.randn(batch, regions, features, generator=g)
    xy = torch.rand(batch, regions, 2, generator=g) * 0.5
    wh = torch.rand(batch, regions, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + wh, (wh[..., :1] * wh[..., 1:])], dim=-1)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -1] = 0
    region_mask = torch.ones(batch, regions, dtype=torch.bool)
    region_mask[0, -2:] = False
    return ids, feats, boxes, mask, region_mask


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_vilbert_forward_backward(backend):
    torch.manual_seed(0)
    model = ViLBERT(tiny_config())
    ids, feats, boxes, mask, region_mask = _region_inputs()
    with K.backend(backend):
        out = model(ids, feats, boxes, mask, region_mask)
        assert out["mlm_logits"].shape == (2, 5, 50)
        assert out["region_logits"].shape == (2, 6, 7)
        assert out["alignment_logits"].shape == (2, 2)
        mlm_labels = torch.full_like(ids, -100)
        mlm_labels[:, 1] = ids[:, 1]
        region_labels = torch.full((2, 6), -1)
        region_labels[:, 2] = 1
        losses = vilbert_pretraining_loss(out, mlm_labels, torch.softmax(torch.randn(2, 6, 7), -1), region_labels,
                                          torch.tensor([1, 0]))
        losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if p.requires_grad and not n.startswith("text_embeddings.token_type"))


def test_vilbert_triton_equals_reference_path():
    torch.manual_seed(0)
    model = ViLBERT(tiny_config())
    inputs = _region_inputs()
    with K.backend("triton"):
        fused = model(*inputs)
    with K.backend("reference"):
        plain = model(*inputs)
    for key in ("text", "visual", "alignment_logits"):
        assert_close(fused[key], plain[key], name=key)


def test_vilbert_layer_plan_follows_the_reference_config():
    """Text layers < t_biattention_id[i] and visual layers < v_biattention_id[i] run before co-attention i."""
    model = ViLBERT(tiny_config())
    order = []
    for name, module in model.named_modules():
        if name.count(".") == 1 and name.split(".")[0] in ("text_layers", "visual_layers", "co_layers"):
            module.register_forward_hook(lambda m, a, o, name=name: order.append(name))
    model(*_region_inputs())
    assert order == ["text_layers.0", "co_layers.0", "visual_layers.0", "text_layers.1", "co_layers.1",
                     "visual_layers.1", "text_layers.2"]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_vlbert_forward_backward(backend):
    torch.manual_seed(0)
    model = VLBERT(tiny_config(), image_token_id=3)
    ids, feats, boxes, mask, region_mask = _region_inputs()
    with K.backend(backend):
        out = model(ids, feats, boxes, mask, region_mask)
        assert out["hidden"].shape == (2, 11, 32)
        labels = torch.full((2, 6), -1)
        labels[0, 1] = 1
        loss = mlm_loss(out["mlm_logits"], torch.where(mask.bool(), ids, -100)) + masked_region_classification(
            out["region_logits"], torch.softmax(torch.randn(2, 6, 7), -1), labels)
        loss.backward()
    assert torch.isfinite(loss)
    assert model.visual_projection.weight.grad.abs().sum() > 0


def test_vlbert_padding_keys_are_not_attended():
    """Changing a padded region's features changes nothing for the real tokens."""
    torch.manual_seed(0)
    model = VLBERT(tiny_config(), image_token_id=3).eval()
    ids, feats, boxes, mask, region_mask = _region_inputs()
    out = model(ids, feats, boxes, mask, region_mask)["text"]
    feats2 = feats.clone()
    feats2[0, -1] += 5.0
    out2 = model(ids, feats2, boxes, mask, region_mask)["text"]
    assert_close(out2[0], out[0], name="text of sample 0")


def test_mask_tokens_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 128), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    corrupted, labels = mask_tokens(ids, mask_token_id=4, vocab_size=1000, special_tokens=special, generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert (labels[chosen] == ids[chosen]).all()
    rate = chosen.float().mean().item()
    assert 0.14 < rate < 0.16
    masked = (corrupted == 4) & chosen
    kept = (corrupted == ids) & chosen
    assert 0.77 < masked.sum().item() / chosen.sum().item() < 0.83
    assert 0.08 < kept.sum().item() / chosen.sum().item() < 0.12  # 10% kept (+ random draws equal to the id)
    assert (corrupted[~chosen] == ids[~chosen]).all()


def test_mask_regions_statistics_and_global_feature():
    g = torch.Generator().manual_seed(0)
    batch, regions = 256, 20
    feats = torch.rand(batch, regions, 8, generator=g) + 0.5
    boxes = torch.tensor([[i / 40, 0.0, i / 40 + 0.02, 0.5, 0.01] for i in range(regions)]).expand(batch, -1, -1)
    region_mask = torch.ones(batch, regions, dtype=torch.bool)
    region_mask[:, -4:] = False
    out, labels = mask_regions(feats, boxes, region_mask, generator=g)
    chosen = labels == 1
    assert not chosen[:, 0].any() and not chosen[:, -4:].any()
    assert 0.13 < chosen[:, 1:-4].float().mean().item() < 0.17
    zeroed = (out[:, 1:] == 0).all(-1) & chosen[:, 1:]
    assert 0.85 < zeroed.sum().item() / chosen.sum().item() < 0.95
    # Region 0 = mean of the real, unchosen, non-overlapping regions (these boxes overlap nothing).
    keep = region_mask & ~chosen
    keep[:, 0] = False
    expected = (feats * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
    assert_close(out[:, 0], expected, name="global feature")


def test_mask_regions_excludes_overlapping_regions_from_the_global_feature():
    feats = torch.arange(1.0, 5.0).view(1, 4, 1).repeat(1, 1, 2)
    boxes = torch.tensor([[[0, 0, 1, 1, 1], [0, 0, 0.5, 0.5, 0.25], [0, 0, 0.5, 0.45, 0.2], [0.6, 0.6, 1, 1, 0.16]]])
    region_mask = torch.ones(1, 4, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    while True:  # draw until exactly region 1 is chosen
        out, labels = mask_regions(feats, boxes, region_mask, generator=g, probability=0.4)
        if labels.tolist() == [[-1, 1, -1, -1]]:
            break
    assert box_iou(boxes)[0, 1, 2] > 0.4
    assert_close(out[0, 0], torch.tensor([4.0, 4.0]), name="global = region 3 only")


def test_masked_region_kl_matches_hand_computation():
    logits = torch.randn(2, 3, 5)
    target = torch.softmax(torch.randn(2, 3, 5), -1)
    labels = torch.tensor([[1, -1, 1], [-1, -1, 1]])
    loss = masked_region_kl(logits, target, labels)
    per_region = F.kl_div(F.log_softmax(logits, -1), target, reduction="none").sum(-1)
    expected = per_region[labels == 1].mean()
    assert_close(loss, expected, name="KL")
    assert masked_region_kl(logits, target, torch.full((2, 3), -1)) == 0


def test_mismatch_captions_never_keeps_own_caption_when_swapped():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(40).view(40, 1).repeat(1, 3)
    mask = torch.ones_like(ids)
    new_ids, _, labels = mismatch_captions(ids, mask, generator=g)
    swapped = labels == 0
    assert 0.3 < swapped.float().mean() < 0.7
    assert (new_ids[swapped, 0] != ids[swapped, 0]).all()
    assert (new_ids[~swapped] == ids[~swapped]).all()


def test_bad_inputs_name_the_argument():
    model = ViLBERT(tiny_config())
    ids, feats, boxes, mask, region_mask = _region_inputs()
    with pytest.raises(ValueError, match="region_features: feature width 23"):
        model(ids, feats[..., :23], boxes, mask, region_mask)
    bad_boxes = boxes.clone()
    bad_boxes[0, 0, 2] = 1.5
    with pytest.raises(ValueError, match="region_boxes: .*\\[0, 1\\]"):
        model(ids, feats, bad_boxes, mask, region_mask)
    many = torch.randn(2, 13, 24)
    with pytest.raises(ValueError, match="max_regions=12"):
        model(ids, many, torch.rand(2, 13, 5) * 0.5, mask, torch.ones(2, 13, dtype=torch.bool))
    with pytest.raises(ValueError, match="region_features: batch 1"):
        model(ids, feats[:1], boxes[:1], mask, region_mask[:1])
    with pytest.raises(ValueError, match="region_mask"):
        model(ids, feats, boxes, mask, region_mask.long())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(0, 50, (2, 41)), feats, boxes)
    with pytest.raises(ValueError, match="v_biattention_id and t_biattention_id"):
        tiny_config(v_biattention_id=[0])
    with pytest.raises(ValueError, match="bi_hidden_size=31 is not divisible"):
        tiny_config(bi_hidden_size=31)


def test_benchmark_sdpa_provider_matches_the_fused_attention():
    """The SDPA peer of ``python -m vlmcore.bench vilbert`` computes the same block (so its timings compare)."""
    from vlmcore.bench import vilbert as bench

    from vlmcore.vilbert import attend

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, -3:] = False
    with K.backend("triton"):
        fused = attend(q, k, v, mask, 2)
    assert_close(bench.sdpa_attend(q, k, v, mask, 2), fused, name="sdpa vs fused")
    flops, nbytes = bench.floors(512, 36, 36, 1024, 768, 1024, 8, 1024, 3072, 2)
    assert flops["fwd_bwd"] == 3 * flops["fwd"] > 0 and nbytes["fwd_bwd"] > nbytes["fwd"] > 0


def test_pooler_activation_option():
    ids, feats, boxes, mask, region_mask = _region_inputs()
    torch.manual_seed(0)
    relu = ViLBERT(tiny_config())(ids, feats, boxes, mask, region_mask)
    assert (relu["pooled_text"] >= 0).all()
    torch.manual_seed(0)
    tanh = ViLBERT(tiny_config(pooler_activation="tanh"))(ids, feats, boxes, mask, region_mask)
    assert (tanh["pooled_text"] < 0).any() and (tanh["pooled_text"].abs() < 1).all()
    with pytest.raises(ValueError, match="pooler_activation must be one of"):
        tiny_config(pooler_activation="gelu")
