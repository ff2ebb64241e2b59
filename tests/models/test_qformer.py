"""QFormer vs Hugging Face ``Blip2QFormerModel`` (tiny config, random init, weights loaded by name).

Same outputs and the same gradients of a loss on them (inputs, query tokens and every mapped
parameter), with the image cross-attention on the Triton kernel (interpreter on CPU) and on the
reference path; the three BLIP-2 self-attention masks; the ITG key/value reuse; bad inputs.
"""

import pytest
import torch
from helpers.numerics import assert_close
from transformers import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings
from vlmcore.kernels import backend

from vlmcore.blip2 import QFormer, hf_qformer_key, self_attention_mask

WIDTH, HIDDEN, HEADS, LAYERS, QUERIES, VOCAB, MAX_POS = 24, 32, 2, 3, 8, 50, 16


def _hf_pair():
    config = Blip2QFormerConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, intermediate_size=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, max_position_embeddings=MAX_POS,
                                cross_attention_frequency=2, encoder_hidden_size=WIDTH,
                                use_qformer_text_input=True, pad_token_id=0)
    config._attn_implementation = "eager"
    hf = Blip2QFormerModel(config).eval()
    embeddings = Blip2TextEmbeddings(config).eval()
    query_tokens = torch.nn.Parameter(torch.randn(1, QUERIES, HIDDEN) * 0.5)
    with torch.no_grad():  # HF inits LayerNorms to (1, 0): perturb so a swapped name would show
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = QFormer(WIDTH, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, intermediate_size=64,
                   num_query_tokens=QUERIES, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                   dropout=0.0, attention_dropout=0.0).eval()
    state = {f"qformer.{k}": v for k, v in hf.state_dict().items()}
    state.update({f"embeddings.{k}": v for k, v in embeddings.state_dict().items()})
    state["query_tokens"] = query_tokens.detach()
    unused = ours.load_hf_state_dict(state)
    assert unused == ["embeddings.position_ids"] or unused == []
    return hf, embeddings, query_tokens, ours


def _inputs(batch=3, image_tokens=10, text_length=5):
    image = torch.randn(batch, image_tokens, WIDTH)
    image_mask = torch.ones(batch, image_tokens, dtype=torch.bool)
    image_mask[1, 7:] = False
    text = torch.randint(1, VOCAB, (batch, text_length))
    text_mask = torch.ones(batch, text_length, dtype=torch.long)
    text_mask[0, 3:] = 0
    text_mask[2, 4:] = 0
    return image, image_mask, text, text_mask


def _pairs_of_grads(hf, ours):
    """(name, hf grad, our grad) for every parameter."""
    hf_params = dict(hf.named_parameters())
    out = []
    for name, p in ours.named_parameters():
        key = next((k for k in hf_params if hf_qformer_key(f"qformer.{k}") == name), None)
        if key is not None:
            out.append((name, hf_params[key].grad, p.grad))
    return out


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("with_text", [False, True])
def test_qformer_matches_hf_outputs_and_grads(path, with_text):
    hf, hf_embed, query_tokens, ours = _hf_pair()
    image, image_mask, text, text_mask = _inputs()
    image_hf = image.clone().requires_grad_(True)
    image_ours = image.clone().requires_grad_(True)
    weight = torch.randn(3, QUERIES + (text.shape[1] if with_text else 0), HIDDEN)

    queries = query_tokens.expand(3, -1, -1)
    if with_text:
        # HF builds the image mask with the rows of the whole sequence but applies it to the query
        # slice only (a shape error with text): the padded image is checked in the query-only case.
        image_mask = None  # ITM form: queries + text, bidirectional with padding
        query_embeds = torch.cat([queries, hf_embed(text)], dim=1)
        full_mask = torch.cat([torch.ones(3, QUERIES, dtype=torch.long), text_mask], dim=1)
    else:
        query_embeds, full_mask = queries, None
    hf_out = hf(query_embeds=query_embeds, query_length=QUERIES, attention_mask=full_mask,
                encoder_hidden_states=image_hf,
                encoder_attention_mask=None if image_mask is None else image_mask.long()).last_hidden_state
    (hf_out * weight).sum().backward()

    with backend(path):
        if with_text:
            out = ours(image_ours, text, text_mask, image_mask=image_mask, mode="bidirectional")
        else:
            out = ours.encode_image(image_ours, image_mask)
        (out * weight).sum().backward()

    assert_close(out, hf_out, atol=1e-5, rtol=1e-5, name="output")
    assert_close(image_ours.grad, image_hf.grad, atol=1e-5, rtol=1e-5, name="d image_embeds")
    assert_close(ours.query_tokens.grad, query_tokens.grad, atol=1e-5, rtol=1e-5, name="d query_tokens")
    checked = 0
    for name, g_hf, g_ours in _pairs_of_grads(hf, ours):
        if g_hf is None:  # text FFN of a query-only pass
            assert g_ours is None or not g_ours.any(), name
            continue
        assert_close(g_ours, g_hf, atol=1e-5, rtol=1e-5, name=f"d {name}")
        checked += 1
    assert checked >= LAYERS * 10
    if with_text:
        for name in ("word_embeddings.weight", "position_embeddings.weight"):
            hf_grad = dict(hf_embed.named_parameters())[name].grad
            assert_close(dict(ours.named_parameters())[name].grad, hf_grad, atol=1e-5, rtol=1e-5, name=name)


def test_text_alone_matches_hf():
    """ITC text side: text with no queries (HF query_length=0) through the text FFNs."""
    hf, hf_embed, _, ours = _hf_pair()
    _, _, text, text_mask = _inputs()
    hf_out = hf(query_embeds=hf_embed(text), query_length=0, attention_mask=text_mask).last_hidden_state
    assert_close(ours.encode_text(text, text_mask), hf_out, atol=1e-5, rtol=1e-5)


def test_unimodal_mask_equals_separate_passes_and_causal_kv_reuse_is_exact():
    torch.manual_seed(1)
    ours = QFormer(WIDTH, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, intermediate_size=64,
                   num_query_tokens=QUERIES, vocab_size=VOCAB, max_position_embeddings=MAX_POS).eval()
    image, image_mask, text, text_mask = _inputs()
    joint = ours(image, text, text_mask, image_mask=image_mask, mode="unimodal")
    assert_close(joint[:, :QUERIES], ours.encode_image(image, image_mask), atol=1e-5, rtol=1e-5, name="queries")
    assert_close(joint[:, QUERIES:], ours.encode_text(text, text_mask), atol=1e-5, rtol=1e-5, name="text")

    causal = ours(image, text, text_mask, image_mask=image_mask, mode="causal")
    query_out, kv = ours.encode_image(image, image_mask, return_kv=True)
    assert_close(causal[:, :QUERIES], query_out, atol=1e-5, rtol=1e-5, name="causal queries")
    assert_close(ours.decode_text(text, text_mask, kv), causal[:, QUERIES:], atol=1e-5, rtol=1e-5, name="itg text")
    # causality: changing a later token leaves earlier outputs unchanged
    changed = text.clone()
    changed[:, -1] = (changed[:, -1] % (VOCAB - 1)) + 1
    assert_close(ours.decode_text(changed, text_mask, kv)[:, :-1], causal[:, QUERIES:-1], atol=1e-6, rtol=1e-6)


def test_self_attention_masks():
    mask = torch.tensor([[1, 1, 0]])
    q = 2
    bi = self_attention_mask(q, mask, "bidirectional")[0, 0]
    uni = self_attention_mask(q, mask, "unimodal")[0, 0]
    causal = self_attention_mask(q, mask, "causal")[0, 0]
    assert bi.tolist() == [[True, True, True, True, False]] * 5
    assert uni[:2].tolist() == [[True, True, False, False, False]] * 2
    assert uni[2:].tolist() == [[False, False, True, True, False]] * 3
    assert causal[:2].tolist() == [[True, True, False, False, False]] * 2
    assert causal[2:].tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                   [True, True, True, True, False]]
    with pytest.raises(ValueError, match="mode"):
        self_attention_mask(q, mask, "full")


def test_bad_inputs_name_the_argument():
    ours = QFormer(WIDTH, hidden_size=HIDDEN, num_layers=2, num_heads=HEADS, intermediate_size=64,
                   num_query_tokens=QUERIES, vocab_size=VOCAB, max_position_embeddings=MAX_POS)
    image, image_mask, text, text_mask = _inputs()
    with pytest.raises(ValueError, match="image_embeds must have width vision_width=24"):
        ours.encode_image(torch.randn(3, 10, WIDTH + 1))
    with pytest.raises(ValueError, match="text_ids has length 17, longer than the position table"):
        ours(image, torch.ones(3, MAX_POS + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="image_embeds has batch 2 but text_ids has batch 3"):
        ours(image[:2], text)
    with pytest.raises(ValueError, match="attention_mask must have the shape of text_ids"):
        ours(image, text, text_mask[:, :2])
    with pytest.raises(ValueError, match="image_mask must be"):
        ours.encode_image(image, image_mask[:, :3])
    with pytest.raises(TypeError, match="text_ids"):
        ours(image, text.float())


def test_hf_load_refuses_mismatches_by_name():
    hf, _, _, ours = _hf_pair()
    state = {f"qformer.{k}": v for k, v in hf.state_dict().items()}
    state["query_tokens"] = torch.zeros(1, QUERIES, HIDDEN)
    bad = dict(state)
    bad["qformer.encoder.layer.0.crossattention.attention.key.weight"] = torch.zeros(HIDDEN, WIDTH + 1)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.crossattention\.attention\.key\.weight"):
        ours.load_hf_state_dict(bad, strict=False)
    with pytest.raises(ValueError, match="lacks 2 parameters.*word_embeddings"):
        ours.load_hf_state_dict(state)  # no text embeddings in a bare Blip2QFormerModel
    assert ours.load_hf_state_dict(state, strict=False) == []
    extra = dict(state)
    extra["qformer.encoder.layer.9.attention.output.dense.weight"] = torch.zeros(HIDDEN, HIDDEN)
    with pytest.raises(ValueError, match=r"map to no parameter.*layer\.9"):
        ours.load_hf_state_dict(extra, strict=False)


@pytest.mark.gpu
def test_qformer_bf16_on_cuda_matches_fp32_hf():
    """The compiled kernel in bf16 at a GPU-sane head dim (64) against HF in fp32."""
    config = Blip2QFormerConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, encoder_hidden_size=96)
    hf = Blip2QFormerModel(config).cuda().eval()
    ours = QFormer(96, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, num_query_tokens=32,
                   dropout=0.0, attention_dropout=0.0).cuda().eval()
    state = {f"qformer.{k}": v for k, v in hf.state_dict().items()}
    state["query_tokens"] = ours.query_tokens.detach().clone()
    ours.load_hf_state_dict(state, strict=False)
    image = torch.randn(4, 257, 96, device="cuda")
    expected = hf(query_embeds=state["query_tokens"].expand(4, -1, -1), encoder_hidden_states=image).last_hidden_state
    got = ours.to(torch.bfloat16).encode_image(image.bfloat16())
    assert_close(got, expected, atol=5e-2, rtol=5e-2, name="bf16 query outputs")
