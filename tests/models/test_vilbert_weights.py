"""vilbert-multi-task weights in and out of :class:`vlmcore.ViLBERT` (``vlmcore/vilbert_convert.py``).

vilbert-multi-task is not installed: this file lists its parameter names and shapes
(:func:`peer_state_dict`, from ``vilbert/vilbert.py``'s ``BertForMultiModalPreTraining`` /
``VILBertForVLTasks``) and re-states its layer math in plain PyTorch (``BertLayer``, ``BertImageLayer``,
``BertConnectionLayer``, embeddings, poolers, ``BertPreTrainingHeads``, the additive -10000 masks).
Our layers loaded from that state dict give the same outputs and gradients (fp32, 1e-5); the export
round-trips; bad checkpoints are refused by one key report.

The three widths differ (text 32, visual 24, co-attention 16) so that a swapped stream cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch
import vlmcore.kernels as K
from helpers.numerics import assert_close

from vlmcore.checkpoint_keys import CheckpointKeysError
from vlmcore.vilbert import ViLBERT, ViLBERTConfig
from vlmcore.vilbert_convert import (
    load_vilbert_multitask_state_dict,
    peer_key_map,
    vilbert_multitask_config,
    vilbert_multitask_state_dict,
)

PEER_POSITIONS = 64  # the reference keeps 512 position rows; more than ours (40) either way
TOL = dict(atol=1e-5, rtol=1e-5)


def config(**overrides) -> ViLBERTConfig:
    sizes = dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=40, v_feature_size=20, v_hidden_size=24, v_num_hidden_layers=2,
                 v_num_attention_heads=2, v_intermediate_size=40, bi_hidden_size=16, bi_num_attention_heads=2,
                 v_biattention_id=[0, 1], t_biattention_id=[1, 2], v_target_size=7, max_regions=12,
                 hidden_dropout_prob=0.0)
    sizes.update(overrides)
    return ViLBERTConfig(**sizes)


# ------------------------------------------------------------------ the reference's names and math


def _peer_shapes(c: ViLBERTConfig, task_heads: bool) -> dict[str, tuple[int, ...]]:
    """Every parameter of vilbert-multi-task's model at sizes ``c`` -> its shape (``task_heads``: two of
    ``VILBertForVLTasks``' heads, at a small answer count)."""
    shapes = {}

    def linear(name, out, inp):
        shapes.update({f"{name}.weight": (out, inp), f"{name}.bias": (out,)})

    def norm(name, width):
        shapes.update({f"{name}.weight": (width,), f"{name}.bias": (width,)})

    def bert_layer(p, width, inter):
        for proj in ("query", "key", "value"):
            linear(f"{p}.attention.self.{proj}", width, width)
        linear(f"{p}.attention.output.dense", width, width)
        norm(f"{p}.attention.output.LayerNorm", width)
        linear(f"{p}.intermediate.dense", inter, width)
        linear(f"{p}.output.dense", width, inter)
        norm(f"{p}.output.LayerNorm", width)

    h, vh, bi = c.hidden_size, c.v_hidden_size, c.bi_hidden_size
    shapes.update({"bert.embeddings.word_embeddings.weight": (c.vocab_size, h),
                   "bert.embeddings.position_embeddings.weight": (PEER_POSITIONS, h),
                   "bert.embeddings.token_type_embeddings.weight": (c.type_vocab_size, h)})
    norm("bert.embeddings.LayerNorm", h)
    linear("bert.v_embeddings.image_embeddings", vh, c.v_feature_size)
    linear("bert.v_embeddings.image_location_embeddings", vh, 5)
    norm("bert.v_embeddings.LayerNorm", vh)
    for i in range(c.num_hidden_layers):
        bert_layer(f"bert.encoder.layer.{i}", h, c.intermediate_size)
    for i in range(c.v_num_hidden_layers):
        bert_layer(f"bert.encoder.v_layer.{i}", vh, c.v_intermediate_size)
    for i in range(len(c.v_biattention_id)):
        p = f"bert.encoder.c_layer.{i}"
        for proj in ("query", "key", "value"):
            linear(f"{p}.biattention.{proj}1", bi, vh)
            linear(f"{p}.biattention.{proj}2", bi, h)
        for side, width in (("1", vh), ("2", h)):
            linear(f"{p}.biOutput.dense{side}", width, bi)
            linear(f"{p}.biOutput.q_dense{side}", width, bi)
            norm(f"{p}.biOutput.LayerNorm{side}", width)
        for stream, width, inter in (("v", vh, c.v_intermediate_size), ("t", h, c.intermediate_size)):
            linear(f"{p}.{stream}_intermediate.dense", inter, width)
            linear(f"{p}.{stream}_output.dense", width, inter)
            norm(f"{p}.{stream}_output.LayerNorm", width)
    linear("bert.t_pooler.dense", bi, h)
    linear("bert.v_pooler.dense", bi, vh)
    linear("cls.predictions.transform.dense", h, h)
    norm("cls.predictions.transform.LayerNorm", h)
    shapes["cls.predictions.bias"] = (c.vocab_size,)
    linear("cls.bi_seq_relationship", 2, bi)
    linear("cls.imagePredictions.transform.dense", vh, vh)
    norm("cls.imagePredictions.transform.LayerNorm", vh)
    linear("cls.imagePredictions.decoder", c.v_target_size, vh)
    if task_heads:
        linear("vil_prediction.logit_fc.0", 2 * bi, bi)
        norm("vil_prediction.logit_fc.2", 2 * bi)
        linear("vil_prediction.logit_fc.3", 5, 2 * bi)
        linear("vil_logit", 1, bi)
    return shapes


def peer_state_dict(c: ViLBERTConfig, seed: int = 0, task_heads: bool = True) -> dict[str, torch.Tensor]:
    """A trained-looking vilbert-multi-task state dict (LayerNorm weights near 1), the decoder tied as
    the reference ties it (the same tensor as the word embeddings)."""
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=g) * 0.2 + (1.0 if "LayerNorm.weight" in name or
                                                             "logit_fc.2.weight" in name else 0.0)
             for name, shape in _peer_shapes(c, task_heads).items()}
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    return state


def _linear(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _layer_norm(sd, name, x):
    """The reference's ``BertLayerNorm`` (TF style: epsilon inside the square root, 1e-12)."""
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return sd[f"{name}.weight"] * (x - u) / torch.sqrt(s + 1e-12) + sd[f"{name}.bias"]


def _gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _extended(mask):
    """``BertModel``'s additive mask: ``[B, K]`` 1/0 -> ``[B, 1, 1, K]`` of 0 / -10000."""
    return (1.0 - mask[:, None, None, :].float()) * -10000.0


def _attention(q, k, v, extended_mask, heads):
    b, lq, width = q.shape
    dh = width // heads
    q, k, v = (t.view(b, -1, heads, dh).permute(0, 2, 1, 3) for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + extended_mask, dim=-1)
    return (probs @ v).permute(0, 2, 1, 3).reshape(b, lq, width)


def peer_bert_layer(sd, p, x, extended_mask, heads):
    """``BertLayer`` / ``BertImageLayer`` (no dynamic attention) ``p`` of ``sd``: ``[B, L, W] -> [B, L, W]``."""
    a = f"{p}.attention"
    ctx = _attention(*(_linear(sd, f"{a}.self.{n}", x) for n in ("query", "key", "value")), extended_mask, heads)
    x = _layer_norm(sd, f"{a}.output.LayerNorm", _linear(sd, f"{a}.output.dense", ctx) + x)
    return _layer_norm(sd, f"{p}.output.LayerNorm",
                       _linear(sd, f"{p}.output.dense", _gelu(_linear(sd, f"{p}.intermediate.dense", x))) + x)


def peer_connection_layer(sd, p, image, image_ext, text, text_ext, heads):
    """``BertConnectionLayer`` ``p``: ``BertBiAttention`` (1 = image, 2 = text; scores1 = text queries x image
    keys under the image mask), ``BertBiOutput`` (q_dense unused), then each stream's FFN."""
    b = f"{p}.biattention"
    text_ctx = _attention(_linear(sd, f"{b}.query2", text), _linear(sd, f"{b}.key1", image),
                          _linear(sd, f"{b}.value1", image), image_ext, heads)
    image_ctx = _attention(_linear(sd, f"{b}.query1", image), _linear(sd, f"{b}.key2", text),
                           _linear(sd, f"{b}.value2", text), text_ext, heads)
    o = f"{p}.biOutput"
    image = _layer_norm(sd, f"{o}.LayerNorm1", _linear(sd, f"{o}.dense1", image_ctx) + image)
    text = _layer_norm(sd, f"{o}.LayerNorm2", _linear(sd, f"{o}.dense2", text_ctx) + text)

    def ffn(stream, x):
        hidden = _gelu(_linear(sd, f"{p}.{stream}_intermediate.dense", x))
        return _layer_norm(sd, f"{p}.{stream}_output.LayerNorm", _linear(sd, f"{p}.{stream}_output.dense", hidden) + x)

    return ffn("v", image), ffn("t", text)


def peer_forward(sd, c: ViLBERTConfig, ids, feats, boxes, mask, region_mask) -> dict[str, torch.Tensor]:
    """``BertForMultiModalPreTraining`` without labels (``BertModel`` + ``BertPreTrainingHeads``, eval)."""
    length = ids.shape[1]
    text = (sd["bert.embeddings.word_embeddings.weight"][ids]
            + sd["bert.embeddings.position_embeddings.weight"][:length]
            + sd["bert.embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)])
    text = _layer_norm(sd, "bert.embeddings.LayerNorm", text)
    image = _layer_norm(sd, "bert.v_embeddings.LayerNorm", _linear(sd, "bert.v_embeddings.image_embeddings", feats)
                        + _linear(sd, "bert.v_embeddings.image_location_embeddings", boxes))
    text_ext, image_ext = _extended(mask), _extended(region_mask)
    t_start = v_start = 0
    for i, (v_end, t_end) in enumerate(zip(c.v_biattention_id, c.t_biattention_id)):
        for j in range(t_start, t_end):
            text = peer_bert_layer(sd, f"bert.encoder.layer.{j}", text, text_ext, c.num_attention_heads)
        for j in range(v_start, v_end):
            image = peer_bert_layer(sd, f"bert.encoder.v_layer.{j}", image, image_ext, c.v_num_attention_heads)
        image, text = peer_connection_layer(sd, f"bert.encoder.c_layer.{i}", image, image_ext, text, text_ext,
                                            c.bi_num_attention_heads)
        t_start, v_start = t_end, v_end
    for j in range(v_start, c.v_num_hidden_layers):
        image = peer_bert_layer(sd, f"bert.encoder.v_layer.{j}", image, image_ext, c.v_num_attention_heads)
    for j in range(t_start, c.num_hidden_layers):
        text = peer_bert_layer(sd, f"bert.encoder.layer.{j}", text, text_ext, c.num_attention_heads)
    pooled_t = torch.relu(_linear(sd, "bert.t_pooler.dense", text[:, 0]))
    pooled_v = torch.relu(_linear(sd, "bert.v_pooler.dense", image[:, 0]))
    t = _layer_norm(sd, "cls.predictions.transform.LayerNorm",
                    _gelu(_linear(sd, "cls.predictions.transform.dense", text)))
    v = _layer_norm(sd, "cls.imagePredictions.transform.LayerNorm",
                    _gelu(_linear(sd, "cls.imagePredictions.transform.dense", image)))
    return {"text": text, "visual": image, "pooled_text": pooled_t, "pooled_visual": pooled_v,
            "mlm_logits": t @ sd["cls.predictions.decoder.weight"].T + sd["cls.predictions.bias"],
            "region_logits": _linear(sd, "cls.imagePredictions.decoder", v),
            "alignment_logits": _linear(sd, "cls.bi_seq_relationship", pooled_t * pooled_v)}


# ------------------------------------------------------------------------------------ tests


def _inputs(c: ViLBERTConfig, batch=3, length=7, regions=6, seed=5):
    """ids, features, boxes and 1/0 masks with padding in both streams (never a sample without keys)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, c.vocab_size, (batch, length), generator=g)
    feats = torch.randn(batch, regions, c.v_feature_size, generator=g)
    xy, wh = torch.rand(batch, regions, 2, generator=g) * 0.5, torch.rand(batch, regions, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + wh, wh[..., :1] * wh[..., 1:]], dim=-1)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -3:] = 0
    region_mask = torch.ones(batch, regions, dtype=torch.long)
    region_mask[0, -2:] = 0
    region_mask[2, 1:] = 0
    return ids, feats, boxes, mask, region_mask


def _loaded(c: ViLBERTConfig, sd: dict, seed: int = 1) -> ViLBERT:
    torch.manual_seed(seed)  # a different random init than any other model here: the load must overwrite it all
    model = ViLBERT(c)
    load_vilbert_multitask_state_dict(model, sd)
    return model.eval()


def _grads(outputs, weights, inputs):
    return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), inputs)


def _check_layer_grads(ours_outputs, peer_outputs, ours_inputs, peer_inputs, layer, prefix, model, sd):
    """Gradients of the same random projection of both outputs: w.r.t. the inputs, and w.r.t. every
    weight of ``layer`` (ours, under ``prefix``) vs the reference's tensor of the same weight."""
    g = torch.Generator().manual_seed(9)
    weights = [torch.randn(o.shape, generator=g) for o in ours_outputs]
    names = peer_key_map(model)
    params = dict(layer.named_parameters())
    peer_params = [sd[names[f"{prefix}.{n}"]] for n in params]
    got = _grads(ours_outputs, weights, [*ours_inputs, *params.values()])
    want = _grads(peer_outputs, weights, [*peer_inputs, *peer_params])
    for name, a, b in zip(["input"] * len(ours_inputs) + list(params), got, want):
        assert_close(a, b, name=f"grad {name}", **TOL)


def _peer_leaves(sd):
    return {k: v.detach().clone().requires_grad_(True) for k, v in sd.items()}


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_co_attention_layer_matches_the_reference_math(backend):
    c = config()
    sd = _peer_leaves(peer_state_dict(c))
    model = _loaded(c, sd)
    _, _, _, mask, region_mask = _inputs(c)
    g = torch.Generator().manual_seed(2)
    image = torch.randn(3, 6, c.v_hidden_size, generator=g, requires_grad=True)
    text = torch.randn(3, 7, c.hidden_size, generator=g, requires_grad=True)
    with K.backend(backend):
        ours = model.co_layers[1](image, region_mask.bool(), text, mask.bool())
    peer = peer_connection_layer(sd, "bert.encoder.c_layer.1", image, _extended(region_mask), text, _extended(mask),
                                 c.bi_num_attention_heads)
    assert_close(ours[0], peer[0], name="image", **TOL)
    assert_close(ours[1], peer[1], name="text", **TOL)
    _check_layer_grads(ours, peer, [image, text], [image, text], model.co_layers[1], "co_layers.1", model, sd)


@pytest.mark.parametrize("stream", ["text", "visual"])
def test_stream_layer_matches_the_reference_math(stream):
    c = config()
    sd = _peer_leaves(peer_state_dict(c))
    model = _loaded(c, sd)
    _, _, _, mask, region_mask = _inputs(c)
    layer, prefix, key_mask, width, heads = {
        "text": (model.text_layers[2], "bert.encoder.layer.2", mask, c.hidden_size, c.num_attention_heads),
        "visual": (model.visual_layers[1], "bert.encoder.v_layer.1", region_mask, c.v_hidden_size,
                   c.v_num_attention_heads)}[stream]
    x = torch.randn(3, key_mask.shape[1], width, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with K.backend("triton"):
        ours = layer(x, key_mask.bool())
    peer = peer_bert_layer(sd, prefix, x, _extended(key_mask), heads)
    assert_close(ours, peer, name=stream, **TOL)
    ours_prefix = {"text": "text_layers.2", "visual": "visual_layers.1"}[stream]
    _check_layer_grads([ours], [peer], [x], [x], layer, ours_prefix, model, sd)


def test_whole_model_matches_the_reference_and_is_deterministic_after_load():
    c = config()
    sd = peer_state_dict(c)
    ids, feats, boxes, mask, region_mask = _inputs(c)
    first, second = _loaded(c, sd, seed=1), _loaded(c, sd, seed=2)
    with torch.no_grad():
        expected = peer_forward(sd, c, ids, feats, boxes, mask, region_mask)
        got = first(ids, feats, boxes, mask, region_mask.bool())
        again = second(ids, feats, boxes, mask, region_mask.bool())
    for name, value in expected.items():
        assert_close(got[name], value, name=name, **TOL)
    for name in ("pooled_text", "pooled_visual", "alignment_logits"):
        assert torch.equal(got[name], again[name]), name


def test_load_returns_the_allowed_keys_and_strips_module_prefix():
    c = config()
    sd = {f"module.{k}": v for k, v in peer_state_dict(c).items()}
    ignored = load_vilbert_multitask_state_dict(ViLBERT(c), sd)
    assert ignored == sorted([
        "cls.predictions.decoder.weight",
        *(f"bert.encoder.c_layer.{i}.biOutput.q_dense{side}.{p}" for i in (0, 1) for side in (1, 2)
          for p in ("weight", "bias")),
        *(k for k in peer_state_dict(c) if k.startswith(("vil_prediction.", "vil_logit.")))])


def test_export_round_trips_and_lists_every_reference_key():
    c = config()
    torch.manual_seed(3)
    source = ViLBERT(c).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the init: zero biases and unit norms would hide swaps
    exported = vilbert_multitask_state_dict(source)
    reference = {k: v.shape for k, v in peer_state_dict(c, task_heads=False).items()}
    reference["bert.embeddings.position_embeddings.weight"] = torch.Size((c.max_position_embeddings, c.hidden_size))
    assert {k: v.shape for k, v in exported.items()} == reference
    assert torch.equal(exported["cls.predictions.decoder.weight"], exported["bert.embeddings.word_embeddings.weight"])
    loaded = _loaded(c, exported, seed=4)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids, feats, boxes, mask, region_mask = _inputs(c)
    with torch.no_grad():
        want = source(ids, feats, boxes, mask, region_mask.bool())
        got = loaded(ids, feats, boxes, mask, region_mask.bool())
        peer = peer_forward(exported, c, ids, feats, boxes, mask, region_mask)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert_close(want["alignment_logits"], peer["alignment_logits"], name="alignment vs reference", **TOL)


def test_a_removed_and_an_extra_key_are_reported_together():
    c = config()
    sd = peer_state_dict(c)
    del sd["bert.encoder.c_layer.1.biattention.key2.weight"]
    sd["bert.encoder.c_layer.0.biattention.logit1.weight"] = torch.zeros(2, 24)
    with pytest.raises(CheckpointKeysError) as err:
        load_vilbert_multitask_state_dict(ViLBERT(c), sd, "model.vilbert.init x.bin")
    assert err.value.missing == ["bert.encoder.c_layer.1.biattention.key2.weight"]
    assert err.value.unexpected == ["bert.encoder.c_layer.0.biattention.logit1.weight"]
    message = str(err.value)
    assert message.startswith("model.vilbert.init x.bin does not fit the model: missing 1 keys: "
                              "bert.encoder.c_layer.1.biattention.key2.weight; unexpected 1 keys: "
                              "bert.encoder.c_layer.0.biattention.logit1.weight"), message


def test_other_architectures_and_features_without_counterpart_are_reported():
    c = config()
    sd = peer_state_dict(config(v_hidden_size=28, num_hidden_layers=4, t_biattention_id=[1, 3]))
    sd["bert.embeddings.task_embeddings.weight"] = torch.zeros(20, 32)  # task_specific_tokens
    sd["bert.embeddings.position_embeddings.weight"] = torch.zeros(30, 32)  # fewer positions than ours
    with pytest.raises(CheckpointKeysError) as err:
        load_vilbert_multitask_state_dict(ViLBERT(c), sd)
    e = err.value
    assert e.missing == []
    assert "bert.embeddings.task_embeddings.weight" in e.unexpected
    assert all(k.startswith(("bert.encoder.layer.3.", "bert.embeddings.task")) for k in e.unexpected), e.unexpected
    assert "bert.v_embeddings.image_embeddings.weight: (28, 20) vs (24, 20)" in e.mismatched
    assert "bert.embeddings.position_embeddings.weight: (30, 32) vs (40, 32)" in e.mismatched


def test_config_export_refuses_what_the_reference_cannot_build():
    assert vilbert_multitask_config(config())["t_biattention_id"] == [1, 2]
    with pytest.raises(ValueError) as err:
        vilbert_multitask_config(config(pooler_activation="tanh", t_biattention_id=[1, 3]), where="model.vilbert")
    message = str(err.value)
    assert "model.vilbert.pooler_activation: 'tanh'" in message
    assert "model.vilbert.t_biattention_id: [1, 3]" in message
