"""KV-cached BLIP decoding (vlmcore/blip/text.py ``DecoderCache``, ``BLIP.generate(use_cache=True)``)
against the uncached decoder (every step re-runs the whole caption): the same logits step by step,
the same tokens for greedy, beam and seeded nucleus decoding, one new token per cached step, the
image keys / values projected once per generate. Hugging Face equality of the cached path:
tests/models/test_blip.py::test_generate_matches_hf."""

from __future__ import annotations

import pytest
import torch
import vlmcore.kernels as K
from helpers.numerics import assert_close
from helpers.tiny_blip import tiny_blip

from vlmcore.blip import DecoderCache

DECODINGS = {
    "greedy": dict(num_beams=1),
    "beam": dict(num_beams=3, repetition_penalty=1.5),
    "beam_returns_2": dict(num_beams=3, num_return_sequences=2),
    "nucleus": dict(do_sample=True, top_p=0.9, repetition_penalty=1.1, num_return_sequences=2),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_blip(momentum=None).eval()


def images(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _generate(model, pixels, prompt, use_cache, min_length=5, **kwargs):
    torch.manual_seed(11)  # nucleus sampling draws from the global generator
    with torch.no_grad():
        return model.generate(pixels, prompt_ids=prompt, max_length=12, min_length=min_length, use_cache=use_cache,
                              **kwargs)


@pytest.mark.parametrize("decoding", sorted(DECODINGS))
@pytest.mark.parametrize(("batch", "prompt"), [(1, []), (3, [5, 6, 7]), (4, [9])])
def test_cached_tokens_equal_uncached(model, decoding, batch, prompt):
    pixels = images(batch, seed=batch)
    cached = _generate(model, pixels, prompt, True, **DECODINGS[decoding])
    uncached = _generate(model, pixels, prompt, False, **DECODINGS[decoding])
    assert torch.equal(cached, uncached), (cached, uncached)
    assert cached.shape[0] == batch * DECODINGS[decoding].get("num_return_sequences", 1)


def test_cached_tokens_equal_uncached_on_the_triton_path(model):
    pixels = images(2, seed=3)
    with K.backend("triton"):
        cached = _generate(model, pixels, [5], True, num_beams=3)
        uncached = _generate(model, pixels, [5], False, num_beams=3)
    assert torch.equal(cached, uncached), (cached, uncached)


def test_step_by_step_logits_equal_the_full_decoder(model):
    torch.manual_seed(2)
    embeds = model.encode_image(images(2, seed=4))
    ids = torch.randint(3, 30, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the cached steps must keep masking these keys
    with torch.no_grad():
        full = model.decoder_logits(embeds, ids, mask)
        cache = DecoderCache()
        steps = []
        for start, end in [(0, 3), (3, 4), (4, 5), (5, 7)]:  # a prompt, single tokens, then two at once
            hidden = model.text_encoder(ids[:, start:end], mask[:, :end], mode="decoder", image_embeds=embeds,
                                        cache=cache)
            steps.append(model.lm_head(hidden))
    assert cache.get_seq_length() == 7
    assert_close(torch.cat(steps, dim=1)[1, 2:], full[1, 2:], atol=1e-5, rtol=1e-5, name="cached logits (row 1)")
    assert_close(torch.cat(steps, dim=1)[0], full[0], atol=1e-5, rtol=1e-5, name="cached logits (row 0)")


def test_each_cached_step_feeds_one_token_and_projects_the_image_once(model):
    fed, image_projections = [], []
    hooks = [model.text_encoder.embeddings.register_forward_hook(lambda m, args, out: fed.append(args[0].shape[1])),
             model.text_encoder.encoder.layer[0].crossattention.self.key.register_forward_hook(
                 lambda m, args, out: image_projections.append(args[0].shape[0]))]
    try:
        out = _generate(model, images(2, seed=5), [5, 6], True, num_beams=3, min_length=11)
    finally:
        for hook in hooks:
            hook.remove()
    assert fed[0] == 3  # [DEC] + the prompt, once
    assert fed[1:] == [1] * (len(fed) - 1)
    assert len(fed) == out.shape[1]  # one decoder call per generated token
    assert image_projections == [2 * 3]  # once, for every beam of both images


def test_reorder_cache_keeps_the_chosen_rows():
    cache = DecoderCache()
    keys = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 2)
    image = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 5, 2, 2)
    entry = cache.layer(0)
    entry.self_kv, entry.image_kv = (keys, keys + 10), (image, image)
    cache.reorder_cache(torch.tensor([1, 1, 3, 2]))
    assert cache.layer(0).self_kv[0][:, 0, 0, 0].tolist() == [1.0, 1.0, 3.0, 2.0]
    assert cache.layer(0).self_kv[1][:, 0, 0, 0].tolist() == [11.0, 11.0, 13.0, 12.0]
    assert cache.layer(0).image_kv[0] is image  # constant per image: never copied
    assert cache.get_seq_length() == 3


def test_cache_is_refused_outside_the_decoder_and_masks_must_cover_the_cached_tokens(model):
    embeds = model.encode_image(images(1, seed=6))
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="cache is for mode='decoder'"):
        model.text_encoder(ids, mode="multimodal", image_embeds=embeds, cache=DecoderCache())
    cache = DecoderCache()
    model.text_encoder(ids, mode="decoder", image_embeds=embeds, cache=cache)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, cached \+ L\] = \(1, 3\)"):
        model.text_encoder(ids[:, :1], torch.ones(1, 1), mode="decoder", image_embeds=embeds, cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.text_encoder(torch.full((1, 15), 5), mode="decoder", image_embeds=embeds, cache=cache)
