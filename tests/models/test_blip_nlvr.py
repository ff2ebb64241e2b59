"""BLIP NLVR2 (vlmcore/blip/nlvr.py) against a plain PyTorch re-statement of salesforce ``BLIP_NLVR``
(``nlvr_encoder.py``: twin cross-attention, averaged below the merge layer, ``merge_layer`` from it on)
read straight from a salesforce-named state dict: logits and gradients, on both kernel paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import vlmcore.kernels as K
from helpers.numerics import assert_close
from helpers.salesforce_blip import T_DEPTH, T_WIDTH, V_WIDTH, salesforce_bert, salesforce_vit

from vlmcore.blip import BlipNLVR, MEDConfig, blip_vision_encoder

pytest.importorskip("transformers")

VOCAB, ENC, PAD, HEADS = 64, 61, 0, 2
MERGE_FROM = 1  # of T_DEPTH = 2 layers: layer 0 averages, layer 1 merges (salesforce: 6 of 12)


def salesforce_nlvr_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """Random salesforce ``BLIP_NLVR`` weights: ViT, BERT with the twin cross-attention, ``cls_head``."""
    names = dict(salesforce_vit("visual_encoder."))
    for key, shape in salesforce_bert("text_encoder.").items():
        if ".crossattention.self." in key:
            names[key.replace(".self.", ".self0.")] = names[key.replace(".self.", ".self1.")] = shape
        elif ".crossattention.output.dense." in key:
            names[key.replace(".dense.", ".dense0.")] = names[key.replace(".dense.", ".dense1.")] = shape
        else:
            names[key] = shape
    for i in range(MERGE_FROM, T_DEPTH):
        prefix = f"text_encoder.encoder.layer.{i}.crossattention.output.merge_layer."
        names.update({prefix + "weight": (T_WIDTH, 2 * T_WIDTH), prefix + "bias": (T_WIDTH,)})
    names.update({"cls_head.0.weight": (T_WIDTH, T_WIDTH), "cls_head.0.bias": (T_WIDTH,),
                  "cls_head.2.weight": (2, T_WIDTH), "cls_head.2.bias": (2,)})
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in names.items()}
    norms = ("LayerNorm.weight", "norm1.weight", "norm2.weight", "norm.weight")
    for key in [k for k in sd if k.endswith(norms)]:
        sd[key] = 1 + sd[key]
    sd["text_encoder.embeddings.position_ids"] = torch.arange(sd["text_encoder.embeddings.position_ids"].shape[1])[None]
    return sd


def build_nlvr() -> BlipNLVR:
    vision = blip_vision_encoder(hidden_size=V_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=96, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    text = MEDConfig(vocab_size=VOCAB, hidden_size=T_WIDTH, num_hidden_layers=T_DEPTH, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=24, encoder_width=V_WIDTH, bos_token_id=60,
                     enc_token_id=ENC, sep_token_id=2)
    return BlipNLVR(vision, text, merge_from_layer=MERGE_FROM)


# ---- salesforce BLIP_NLVR's text side, re-stated (BERT post-norm, eager attention, -10000 masks) ----

def linear(sd, prefix, x):
    return F.linear(x, sd[prefix + "weight"], sd[prefix + "bias"])


def layer_norm(sd, prefix, x):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + "weight"], sd[prefix + "bias"], eps=1e-12)


def attention(sd, prefix, x, context, additive_mask):
    """BertSelfAttention: heads, softmax(q k^T / sqrt(d) + mask) v."""
    b, length, width = x.shape
    d = width // HEADS

    def heads(t):
        return t.view(b, t.shape[1], HEADS, d).permute(0, 2, 1, 3)

    q, k, v = (heads(linear(sd, prefix + name + ".", src)) for name, src in
               (("query", x), ("key", context), ("value", context)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, length, width)


def salesforce_text_and_head(sd, input_ids, mask, image0, image1):
    """``BLIP_NLVR.forward`` after the ViT: ``[ENC]`` first, nlvr_encoder.BertModel, ``cls_head`` on [CLS]."""
    ids = input_ids.clone()
    ids[:, 0] = ENC
    p = "text_encoder."
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    x = layer_norm(sd, p + "embeddings.LayerNorm.", x)
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(T_DEPTH):
        layer = f"{p}encoder.layer.{i}."
        a = attention(sd, layer + "attention.self.", x, x, extended)
        x = layer_norm(sd, layer + "attention.output.LayerNorm.", linear(sd, layer + "attention.output.dense.", a) + x)
        out = layer + "crossattention.output."
        h0 = linear(sd, out + "dense0.", attention(sd, layer + "crossattention.self0.", x, image0, None))
        h1 = linear(sd, out + "dense1.", attention(sd, layer + "crossattention.self1.", x, image1, None))
        merged = linear(sd, out + "merge_layer.", torch.cat([h0, h1], -1)) if i >= MERGE_FROM else (h0 + h1) / 2
        x = layer_norm(sd, out + "LayerNorm.", merged + x)
        ff = linear(sd, layer + "output.dense.", F.gelu(linear(sd, layer + "intermediate.dense.", x)))
        x = layer_norm(sd, layer + "output.LayerNorm.", ff + x)
    return linear(sd, "cls_head.2.", F.relu(linear(sd, "cls_head.0.", x[:, 0])))


def inputs(b=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    images0, images1 = torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(3, 50, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    ids[1, length - 3:] = PAD
    return images0, images1, ids, mask


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_logits_and_gradients_match_salesforce(path):
    sd = salesforce_nlvr_state_dict()
    ours = build_nlvr().eval()
    ours.load_salesforce_state_dict(sd)
    images0, images1, ids, mask = inputs()
    labels = torch.tensor([1, 0, 1])
    with K.backend(path):
        loss, logits = ours.loss(images0, images1, ids, mask, labels)
    loss.backward()
    embeds = ours.visual_encoder(torch.cat([images0, images1])).detach()
    ref_sd = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in sd.items()}
    expected = salesforce_text_and_head(ref_sd, ids, mask, *embeds.split(3))
    F.cross_entropy(expected, labels).backward()
    assert_close(logits, expected, atol=2e-5, rtol=2e-5, name="nlvr logits")
    params = dict(ours.named_parameters())
    for name in ["cls_head.0.weight", "text_encoder.encoder.layer.0.crossattention.self0.key.weight",
                 "text_encoder.encoder.layer.0.crossattention.self1.query.weight",
                 "text_encoder.encoder.layer.0.crossattention.output.dense1.weight",
                 "text_encoder.encoder.layer.1.crossattention.output.merge_layer.weight",
                 "text_encoder.encoder.layer.1.attention.self.value.weight",
                 "text_encoder.embeddings.word_embeddings.weight"]:
        assert params[name].grad.abs().sum() > 0, name
        assert_close(params[name].grad, ref_sd[name].grad, atol=1e-5, rtol=1e-4, name=name)
    assert params["visual_encoder.model.encoder.layers.0.self_attn.qkv.weight"].grad.abs().sum() > 0


def test_each_image_reaches_its_own_branch():
    ours = build_nlvr().eval()
    ours.load_salesforce_state_dict(salesforce_nlvr_state_dict(seed=1))
    images0, images1, ids, mask = inputs(seed=2)
    with torch.no_grad():
        logits = ours(images0, images1, ids, mask)
        swapped = ours(images1, images0, ids, mask)
    assert not torch.allclose(logits, swapped, atol=1e-4)  # self0 / self1 and dense0 / dense1 differ


def test_loading_refuses_mismatches_by_name():
    ours = build_nlvr()
    sd = salesforce_nlvr_state_dict()
    del sd["text_encoder.encoder.layer.1.crossattention.output.merge_layer.bias"]
    with pytest.raises(ValueError, match="merge_layer.bias"):
        ours.load_salesforce_state_dict(sd)
    sd = salesforce_nlvr_state_dict()
    sd["text_encoder.encoder.layer.0.crossattention.output.merge_layer.weight"] = torch.zeros(T_WIDTH, 2 * T_WIDTH)
    with pytest.raises(ValueError, match="layer.0.crossattention.output.merge_layer"):
        ours.load_salesforce_state_dict(sd)


def test_bad_inputs_name_the_argument():
    ours = build_nlvr()
    images0, images1, ids, mask = inputs()
    with pytest.raises(ValueError, match="images0 and images1"):
        ours(images0, images1[:2], ids, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(images0, images1, ids, mask[:, :3])
    with pytest.raises(ValueError, match="merge_from_layer"):
        BlipNLVR(ours.visual_encoder, ours.config, merge_from_layer=-1)
