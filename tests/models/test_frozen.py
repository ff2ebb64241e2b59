"""FrozenPrefix (Tsimpoukelli et al.): image prefixes at the placeholder positions of a frozen LM."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import vlmcore

hf_logging.set_verbosity_error()

VOCAB, IMG = 40, 3
K = 2


def tiny_frozen(k=K):
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    vision = vlmcore.VisionTransformer(8, 4, 16, 1, 2)
    return vlmcore.FrozenPrefix(vision, lm, image_token_id=IMG, vis_dim=16, num_prefix_tokens=k)


def interleaved():
    """Sample 0: image 0 at 1-2, image 1 at 6-7; sample 1: image 0 at 4-5 only (its image 1 is padding)."""
    ids = torch.randint(4, VOCAB, (2, 10))
    ids[0, [1, 2, 6, 7]] = IMG
    ids[1, [4, 5]] = IMG
    return torch.randn(2, 2, 3, 8, 8), ids


def test_prefix_placement_at_image_positions():
    model = tiny_frozen()
    images, ids = interleaved()
    with torch.no_grad():
        embeds = model.embed(images, ids)
        prefix = model.prefix_embeddings(images)  # [B, T, k, D]
        tokens = model.lang_model.get_input_embeddings()(ids)
    assert prefix.shape == (2, 2, K, 32)
    expected_at = {(0, 1): prefix[0, 0, 0], (0, 2): prefix[0, 0, 1], (0, 6): prefix[0, 1, 0],
                   (0, 7): prefix[0, 1, 1], (1, 4): prefix[1, 0, 0], (1, 5): prefix[1, 0, 1]}
    for b in range(2):
        for t in range(10):
            want = expected_at.get((b, t), tokens[b, t])
            assert torch.equal(embeds[b, t], want), (b, t)
    # the LM runs on exactly these embeddings
    with torch.no_grad():
        logits = model(images, ids).logits
        assert torch.equal(logits, model.lang_model(inputs_embeds=embeds).logits)


def test_image_changes_only_later_logits():
    model = tiny_frozen()
    images, ids = interleaved()
    changed = images.clone()
    changed[0, 1] = torch.randn_like(changed[0, 1])
    with torch.no_grad():
        a, b = model(images, ids).logits, model(changed, ids).logits
    assert torch.equal(a[0, :6], b[0, :6]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0, 6:], b[0, 6:])


def test_lm_frozen_vision_and_mapping_train():
    model = tiny_frozen()
    images, ids = interleaved()
    out = model(images, ids, labels=ids)
    out.loss.backward()
    for name, p in model.lang_model.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    trainable = {id(p) for p in model.trainable_parameters()}
    expected = list(model.vision_encoder.parameters()) + list(model.visual_prefix.parameters())
    assert trainable == {id(p) for p in expected}
    for name, p in list(model.vision_encoder.named_parameters()) + list(model.visual_prefix.named_parameters()):
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name


def test_labels_at_placeholders_are_ignored():
    model = tiny_frozen()
    images, ids = interleaved()
    with torch.no_grad():
        loss = model(images, ids, labels=ids).loss
        masked = ids.masked_fill(ids == IMG, -100)
        expected = model.lang_model(inputs_embeds=model.embed(images, ids), labels=masked).loss
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("positions", [[1], [1, 2, 3], [0, 1, 2, 3, 4, 5]],
                         ids=["not_multiple_of_k", "odd", "too_many"])
def test_bad_placeholder_counts(positions):
    model = tiny_frozen()
    images, ids = interleaved()
    ids[1] = 5
    ids[1, positions] = IMG
    with pytest.raises(ValueError, match="sample 1"):
        model(images, ids)


def test_generate_from_interleaved_prompt():
    model = tiny_frozen(k=1)
    images = torch.randn(2, 1, 3, 8, 8)
    ids = torch.randint(4, VOCAB, (2, 5))
    ids[:, 0] = IMG
    new = model.generate(images, ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert new.shape == (2, 3)


def test_gradient_checkpointing_same_gradients():
    model = tiny_frozen()
    images, ids = interleaved()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model.zero_grad()
        model(images, ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
    assert all(layer.gradient_checkpointing for layer in model.lang_model.model.layers)
    for g1, g0 in zip(grads[1], grads[0]):
        assert torch.allclose(g1, g0, atol=1e-6, rtol=1e-5)


def test_input_errors_name_the_argument():
    model = tiny_frozen()
    images, ids = interleaved()
    with pytest.raises(TypeError, match="input_ids"):
        model(images, ids.float())
    with pytest.raises(ValueError, match="input_ids must be 2-D"):
        model(images, ids[0])
    with pytest.raises(ValueError, match="images must be"):
        model(images[:, 0], ids)
    with pytest.raises(ValueError, match="images must be"):
        model(images[:, :, :2], ids)  # two channels for a three-channel ViT
    with pytest.raises(ValueError, match="attention_mask"):
        model(images, ids, attention_mask=torch.ones(2, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        model(images, ids, labels=ids[:1])
    with pytest.raises(ValueError, match="sample 0"):
        model(images[:, :1], ids)  # sample 0 has two images' placeholders but one image


def test_constructor_and_encoder_width_errors():
    model = tiny_frozen()
    with pytest.raises(ValueError, match="vis_dim"):
        vlmcore.FrozenPrefix(model.vision_encoder, model.lang_model, image_token_id=IMG, vis_dim=0)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        vlmcore.FrozenPrefix(model.vision_encoder, model.lang_model, image_token_id=IMG, vis_dim=16,
                             num_prefix_tokens=0)
    wrong = vlmcore.FrozenPrefix(model.vision_encoder, model.lang_model, image_token_id=IMG, vis_dim=12)
    images, ids = interleaved()
    with pytest.raises(ValueError, match="vis_dim=12"):
        wrong(images, ids)
