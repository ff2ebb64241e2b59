"""Flamingo over tiny transformers causal LMs (Llama and GPT-2 configs, random weights, no download)."""

import copy
import inspect

import pytest
import torch
from helpers.numerics import assert_close
from helpers.tiny_lm import MEDIA, VOCAB, tiny_lm
from torch import nn
from transformers.utils import logging as hf_logging
from vlmcore.kernels import backend

import vlmcore
from vlmcore.flamingo_convert import load_openflamingo_state_dict

hf_logging.set_verbosity_error()

VIS_DIM, IMAGE = 16, 8


def tiny_flamingo(kind: str, layers: int = 2, *, lm=None, vision=None, **kwargs):
    """(Flamingo, an unwrapped copy of its LM); pass ``lm``/``vision`` to reuse weights (they are copied)."""
    lm = tiny_lm(kind, layers) if lm is None else copy.deepcopy(lm)
    bare = copy.deepcopy(lm)
    vision = vlmcore.VisionTransformer(IMAGE, 4, VIS_DIM, 1, 2) if vision is None else copy.deepcopy(vision)
    cfg = dict(media_token_id=MEDIA, vis_dim=VIS_DIM, num_latents=3, resampler_depth=1, dim_head=8, heads=2, ff_mult=2)
    cfg.update(kwargs)
    return vlmcore.Flamingo(vision, lm, **cfg).eval(), bare


def open_gates(model, value=0.5):
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def batch(length=11, images=2):
    """lang_x [2, length]: <image> at 2 and 7 in sample 0, at 0 in sample 1; vision_x [2, images, 1, 3, 8, 8]."""
    lang_x = torch.randint(4, VOCAB, (2, length))
    lang_x[0, [2, 7]] = MEDIA
    lang_x[1, 0] = MEDIA
    return torch.randn(2, images, 1, 3, IMAGE, IMAGE), lang_x


KINDS = ["llama", "gpt2"]
ALL_KINDS = KINDS + ["opt", "qwen2"]  # identity and generation also over these


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_identity_at_init(kind):
    model, bare = tiny_flamingo(kind)
    vision_x, lang_x = batch()
    with torch.no_grad():
        expected = bare(input_ids=lang_x).logits
        got = model(vision_x, lang_x).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_only_bridge_trains(kind):
    model, _ = tiny_flamingo(kind)
    open_gates(model)
    model.train()
    assert not model.vision_encoder.training  # frozen encoder stays in eval mode
    vision_x, lang_x = batch()
    out = model(vision_x, lang_x, labels=lang_x)
    out.loss.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    bridge = {id(p) for p in model.perceiver.parameters()} | {id(p) for p in model.gated_cross_attn_layers.parameters()}
    assert trainable == bridge
    for name, p in model.named_parameters():
        if name.startswith(("lang_model.", "vision_encoder.")):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and float(p.grad.abs().max()) > 0, f"{name} got no gradient"
    # the LM's own parameter list holds no bridge parameter
    assert not ({id(p) for p in model.lang_model.parameters()} & bridge)


@pytest.mark.parametrize("kind", KINDS)
def test_images_are_causal(kind):
    """Changing image 1 (whose <image> is at position 7 of sample 0) leaves logits before 7 unchanged."""
    model, _ = tiny_flamingo(kind)
    open_gates(model)
    vision_x, lang_x = batch()
    changed = vision_x.clone()
    changed[0, 1] = torch.randn_like(changed[0, 1])
    with torch.no_grad():
        a = model(vision_x, lang_x).logits
        b = model(changed, lang_x).logits
    assert torch.equal(a[0, :7], b[0, :7])
    assert float((a[0, 7:] - b[0, 7:]).abs().min()) > 0
    assert torch.equal(a[1], b[1])  # sample 1 never references its image 1
    # and image 0 drives positions 2..6 only (immediate media)
    changed = vision_x.clone()
    changed[0, 0] = torch.randn_like(changed[0, 0])
    with torch.no_grad():
        c = model(changed, lang_x).logits
    assert torch.equal(a[0, :2], c[0, :2])
    assert float((a[0, 2:7] - c[0, 2:7]).abs().min()) > 0


def test_all_previous_mode_sees_earlier_images():
    model, _ = tiny_flamingo("llama", only_attend_immediate_media=False)
    open_gates(model)
    vision_x, lang_x = batch()
    changed = vision_x.clone()
    changed[0, 0] = torch.randn_like(changed[0, 0])
    with torch.no_grad():
        a = model(vision_x, lang_x).logits
        c = model(changed, lang_x).logits
    assert float((a[0, 7:] - c[0, 7:]).abs().min()) > 0  # text after image 1 still sees image 0


@pytest.mark.parametrize("kind", KINDS)
def test_triton_and_reference_backends_agree(kind, device):
    """Tiny shapes: the triton backend runs the kernels in the interpreter on CPU, compiled on CUDA."""
    model, _ = tiny_flamingo(kind, dim_head=16)
    model.to(device)
    open_gates(model)
    vision_x, lang_x = (t.to(device) for t in batch(length=9))
    results = {}
    for name in ("reference", "triton"):
        model.zero_grad()
        with backend(name):
            out = model(vision_x, lang_x, labels=lang_x)
            out.loss.backward()
        results[name] = (out.logits.detach(), model.gated_cross_attn_layers[0].attn.to_q.weight.grad.clone(),
                         model.perceiver.latents.grad.clone())
    for got, expected, what in zip(results["triton"], results["reference"], ("logits", "grad to_q", "grad latents")):
        assert_close(got, expected, name=what, atol=1e-4, rtol=1e-3)


def _greedy_by_full_forward(model, vision_x, lang_x, steps):
    """Greedy decoding without KV cache: re-run the whole sequence each step (EOS and <image> banned,
    as min_new_tokens and bad_words_ids do in generate)."""
    ids = lang_x
    for _ in range(steps):
        with torch.no_grad():
            logits = model(vision_x, ids, use_cache=False).logits[:, -1]
        logits[:, [2, MEDIA]] = float("-inf")
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_generate_with_cached_media(kind):
    model, _ = tiny_flamingo(kind)
    open_gates(model, 1.0)
    vision_x, lang_x = batch(length=9, images=3)
    lang_x[:, -1] = MEDIA  # both prompts end with an image: generated tokens attend it
    # no generated <image> (the full-forward oracle would read it as a new image)
    common = dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=0, bad_words_ids=[[MEDIA]])
    greedy = model.generate(vision_x, lang_x, do_sample=False, **common)
    # greedy with KV cache and cached media == re-running the full sequence (every new token
    # attends the last image in both)
    assert torch.equal(greedy, _greedy_by_full_forward(model, vision_x, lang_x, 5))
    # and the images matter for the generated tokens
    plain = model.lang_model.generate(input_ids=lang_x, do_sample=False, **common)
    assert not torch.equal(greedy, plain)
    beams = model.generate(vision_x, lang_x, num_beams=3, num_return_sequences=2, do_sample=False, **common)
    assert beams.shape == (4, 14) and torch.equal(beams[:, :9], lang_x.repeat_interleave(2, dim=0))
    sampled = model.generate(vision_x, lang_x, do_sample=True, top_p=0.9, **common)
    assert sampled.shape == (2, 14)
    # conditioning is dropped afterwards: the LM alone is the plain LM again
    assert model._state.media is None
    with torch.no_grad():
        assert torch.equal(model.lang_model(input_ids=lang_x).logits, _bare_logits(model, lang_x))


def _bare_logits(model, lang_x):
    with torch.no_grad():
        return model.lang_model(input_ids=lang_x).logits


def _cache_kwargs(lm, output):
    """The KV cache of ``output`` as the keyword this transformers version takes (``cache`` or ``past_key_values``)."""
    if "cache" in inspect.signature(lm.forward).parameters:
        return {"cache": output.cache}
    return {"past_key_values": output.past_key_values}


def test_forward_with_cached_media_and_kv_cache_matches_full_forward():
    model, _ = tiny_flamingo("llama")
    open_gates(model)
    vision_x, lang_x = batch(length=10)
    lang_x[1, 9] = 5  # ordinary tail token
    with torch.no_grad():
        full = model(vision_x, lang_x).logits
        model.cache_media(vision_x)
        try:
            prefix = model(None, lang_x[:, :8], use_cache=True)
            step = model(None, lang_x[:, 8:], use_cache=True, **_cache_kwargs(model.lang_model, prefix))
        finally:
            model.uncache_media()
    assert_close(prefix.logits, full[:, :8], name="prefix logits", atol=1e-5)
    # tokens after the prompt attend each row's last image, as in the full forward here
    assert_close(step.logits, full[:, 8:], name="cached step logits", atol=1e-5)


def test_errors():
    model, _ = tiny_flamingo("llama")
    vision_x, lang_x = batch(images=1)  # sample 0 has two <image> tokens but one image
    with pytest.raises(ValueError, match="image index"):
        model(vision_x, lang_x)
    assert model._state.media is None  # a failed call leaves no conditioning behind
    with pytest.raises(ValueError, match="no media is cached"):
        model(None, lang_x)
    with pytest.raises(ValueError, match="vision_x must be"):
        model(torch.randn(2, 3, IMAGE, IMAGE), lang_x)
    with pytest.raises(ValueError, match="media_token_id"):
        vlmcore.Flamingo(vlmcore.VisionTransformer(IMAGE, 4, VIS_DIM, 1, 2), tiny_lm("gpt2"),
                         media_token_id=VOCAB, vis_dim=VIS_DIM)


def test_cross_attn_every_n_layers_placement():
    model, bare = tiny_flamingo("gpt2", layers=4, cross_attn_every_n_layers=2)
    layers = model.lang_model.transformer.h
    assert len(model.gated_cross_attn_layers) == 2
    wrapped = [i for i, layer in enumerate(layers) if isinstance(layer, vlmcore.flamingo.FlamingoLayer)]
    assert wrapped == [1, 3]
    assert layers[1]._bridge[0] is model.gated_cross_attn_layers[0]
    assert layers[3]._bridge[0] is model.gated_cross_attn_layers[1]
    vision_x, lang_x = batch()
    with torch.no_grad():
        assert torch.equal(model(vision_x, lang_x).logits, bare(input_ids=lang_x).logits)


def test_find_decoder_layers_generic_fallback():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])
            self.trunk = nn.Module()
            self.trunk.stack = nn.ModuleList(Block() for _ in range(3))

    odd = Odd()
    parent, name, layers = vlmcore.find_decoder_layers(odd)
    assert parent is odd.trunk and name == "stack" and layers is odd.trunk.stack
    llama = tiny_lm("llama")
    assert vlmcore.find_decoder_layers(llama)[2] is llama.model.layers


def test_trainable_state_round_trip(tmp_path):
    lm, vision = tiny_lm("llama"), vlmcore.VisionTransformer(IMAGE, 4, VIS_DIM, 1, 2)
    model, _ = tiny_flamingo("llama", lm=lm, vision=vision)
    open_gates(model, 0.3)
    path = tmp_path / "bridge.safetensors"
    model.save_trainable(path)
    state = model.trainable_state_dict()
    bridge = ("perceiver.", "gated_cross_attn_layers.")
    assert set(state) == {n for n, _ in model.named_parameters() if n.startswith(bridge)}
    other, _ = tiny_flamingo("llama", lm=lm, vision=vision)  # same frozen parts, fresh bridge
    vision_x, lang_x = batch()
    with torch.no_grad():
        expected = model(vision_x, lang_x).logits
        assert not torch.equal(other(vision_x, lang_x).logits, expected)
        other.load_trainable(path)
        assert torch.equal(other(vision_x, lang_x).logits, expected)
    # shape mismatch (different latent count) -> clear error naming the key
    wrong, _ = tiny_flamingo("llama", lm=lm, vision=vision, num_latents=4)
    with pytest.raises(ValueError, match="perceiver.latents"):
        wrong.load_trainable(path)
    # missing keys are refused in strict mode, accepted otherwise
    partial = {k: v for k, v in state.items() if not k.startswith("perceiver.")}
    with pytest.raises(ValueError, match="missing keys"):
        other.load_trainable_state_dict(partial)
    other.load_trainable_state_dict(partial, strict=False)


@pytest.mark.parametrize("new_tokens", [True, [MEDIA, 5]], ids=["media_token", "id_list"])
def test_train_new_token_embeddings(new_tokens):
    model, bare = tiny_flamingo("llama", train_new_token_embeddings=new_tokens)
    vision_x, lang_x = batch()
    with torch.no_grad():
        assert torch.equal(model(vision_x, lang_x).logits, bare(input_ids=lang_x).logits)
    assert "new_token_embeddings" in model.trainable_state_dict()
    assert not model.lang_model.get_input_embeddings().weight.requires_grad
    open_gates(model)
    model(vision_x, lang_x, labels=lang_x).loss.backward()
    assert float(model.new_token_embeddings.grad.abs().max()) > 0
    with torch.no_grad():
        model.new_token_embeddings.add_(1.0)  # only positions holding the token change
        before = bare(input_ids=lang_x).logits
        after = model.lang_model(input_ids=lang_x).logits
    assert torch.equal(after[0, :2], before[0, :2])
    assert not torch.equal(after[0, 2:], before[0, 2:])


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_same_gradients(kind):
    model, _ = tiny_flamingo(kind)
    open_gates(model)
    vision_x, lang_x = batch()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        model.train()
        loss = model(vision_x, lang_x, labels=lang_x).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]))
    assert model.gradient_checkpointing and model.perceiver.gradient_checkpointing
    layers = vlmcore.find_decoder_layers(model.lang_model)[2]
    assert all(getattr(layer, "decoder_layer", layer).gradient_checkpointing for layer in layers)
    assert_close(grads[1][0], grads[0][0], name="loss", atol=1e-6)
    for g1, g0 in zip(grads[1][1], grads[0][1]):
        assert_close(g1, g0, name="grad", atol=1e-6, rtol=1e-5)


def test_load_openflamingo_state_dict_by_name():
    lm, vision = tiny_lm("gpt2", layers=4), vlmcore.VisionTransformer(IMAGE, 4, VIS_DIM, 1, 2)
    source, _ = tiny_flamingo("gpt2", lm=lm, vision=vision, cross_attn_every_n_layers=2)
    open_gates(source, 0.25)
    # OpenFlamingo layout: blocks indexed by decoder layer, registered twice, plus frozen weights
    checkpoint, extra = {}, ["lang_encoder.transformer.wte.weight", "vision_encoder.conv1.weight"]
    for key, value in source.trainable_state_dict().items():
        if key.startswith("perceiver."):
            checkpoint[key] = value.clone()
            continue
        _, j, rest = key.split(".", 2)
        layer = source.cross_attn_layer_indices[int(j)]
        checkpoint[f"lang_encoder.gated_cross_attn_layers.{layer}.{rest}"] = value.clone()
        duplicate = f"lang_encoder.transformer.h.{layer}.gated_cross_attn_layer.{rest}"
        checkpoint[duplicate] = value.clone()
        extra.append(duplicate)
    for key in extra[:2]:
        checkpoint[key] = torch.zeros(1)
    target, _ = tiny_flamingo("gpt2", lm=lm, vision=vision, cross_attn_every_n_layers=2)
    unused = load_openflamingo_state_dict(target, checkpoint)
    assert sorted(unused) == sorted(extra)
    for key, value in source.trainable_state_dict().items():
        assert torch.equal(target.trainable_state_dict()[key], value), key
    with pytest.raises(ValueError, match="lacks"):
        load_openflamingo_state_dict(target, {k: v for k, v in checkpoint.items() if "perceiver" not in k})


def test_bf16_language_model():
    """The bridge follows the LM's dtype; identity at init and a backward pass in bf16 (reference backend)."""
    model, bare = tiny_flamingo("llama", lm=tiny_lm("llama").to(torch.bfloat16))  # fp32 vision encoder
    assert model.perceiver.latents.dtype == torch.bfloat16
    assert model.gated_cross_attn_layers[0].attn.to_q.weight.dtype == torch.bfloat16
    vision_x, lang_x = batch()
    with torch.no_grad():
        assert torch.equal(model(vision_x, lang_x).logits, bare(input_ids=lang_x).logits)
    open_gates(model)
    model(vision_x, lang_x, labels=lang_x).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.trainable_parameters())


def test_deepcopy_and_pickle(tmp_path):
    model, _ = tiny_flamingo("gpt2")
    open_gates(model)
    vision_x, lang_x = batch()
    with torch.no_grad():
        expected = model(vision_x, lang_x).logits
    clone = copy.deepcopy(model)
    # the clone's wrapped layers use the clone's own blocks and state
    assert clone.lang_model.transformer.h[0]._bridge[0] is clone.gated_cross_attn_layers[0]
    assert clone.lang_model.transformer.h[0]._bridge[1] is clone._state
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(clone(vision_x, lang_x).logits, expected)
        assert torch.equal(loaded(vision_x, lang_x).logits, expected)
    # attribute reads fall through to the wrapped decoder layer
    assert clone.lang_model.transformer.h[0].attn is clone.lang_model.transformer.h[0].decoder_layer.attn


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_bf16_kernels_agree_with_reference(kind):
    """On a GPU: bf16 Flamingo with the Triton kernels (auto backend) vs the reference backend."""
    model, _ = tiny_flamingo(kind, dim_head=64, heads=2)
    model.cuda().to(torch.bfloat16)
    open_gates(model)
    vision_x, lang_x = batch(length=64, images=2)
    vision_x, lang_x = vision_x.cuda(), lang_x.cuda()
    outputs = {}
    for name in ("reference", "auto"):
        model.zero_grad()
        with backend(name):
            out = model(vision_x, lang_x, labels=lang_x)
            out.loss.backward()
        outputs[name] = (out.logits.float(), model.perceiver.latents.grad.float())
    assert_close(outputs["auto"][0], outputs["reference"][0], name="logits", atol=5e-2, rtol=5e-2)
    assert_close(outputs["auto"][1], outputs["reference"][1], name="grad latents", atol=5e-2, rtol=5e-2)


def test_bridge_learns_to_read_images():
    """End to end: with the LM frozen, a few steps teach the bridge to name the class of the image
    (the token after "<image> is" is the class of a noisy prototype image); blind inputs stay at chance."""
    model, _ = tiny_flamingo("gpt2")
    model.train()
    prototypes = torch.randn(4, 3, IMAGE, IMAGE)

    def make(n):
        labels = torch.randint(0, 4, (n,))
        vision_x = (prototypes[labels] + 0.3 * torch.randn(n, 3, IMAGE, IMAGE))[:, None, None]
        ids = torch.stack([torch.full((n,), MEDIA), torch.full((n,), 6), 10 + labels], dim=1)
        return vision_x, ids, ids.masked_fill(torch.arange(3) < 2, -100), labels

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    for _ in range(60):
        vision_x, ids, labels, _ = make(16)
        loss = model(vision_x, ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    vision_x, ids, _, classes = make(64)
    with torch.no_grad():
        seen = model(vision_x, ids).logits[:, 1].argmax(dim=-1) - 10
        blind = model(torch.zeros_like(vision_x), ids).logits[:, 1].argmax(dim=-1) - 10
    assert float((seen == classes).float().mean()) >= 0.9
    assert float((blind == classes).float().mean()) <= 0.5


def test_input_errors_name_the_argument():
    model, _ = tiny_flamingo("llama")
    vision_x, lang_x = batch()
    with pytest.raises(TypeError, match="lang_x"):
        model(vision_x, lang_x.float())
    with pytest.raises(ValueError, match="lang_x must be 2-D"):
        model(vision_x, lang_x[0])
    with pytest.raises(ValueError, match="vision_x has batch 1 but lang_x has batch 2"):
        model(vision_x[:1], lang_x)
    with pytest.raises(ValueError, match="attention_mask"):
        model(vision_x, lang_x, attention_mask=torch.ones(2, lang_x.shape[1] - 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        model(vision_x, lang_x, attention_mask=torch.ones(1, lang_x.shape[1], dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        model(vision_x, lang_x, labels=lang_x[:, :-1])
    with pytest.raises(ValueError, match="vision_x must be"):
        model(vision_x[:, :, 0], lang_x)  # [B, T_img, C, H, W]: the frame axis is missing
    with pytest.raises(ValueError, match="images must be"):
        model(vision_x[:, :, :, :2], lang_x)  # two channels for a three-channel ViT
    with pytest.raises(ValueError, match="vision_x has batch"):
        model.generate(vision_x[:1], lang_x, max_new_tokens=1)
    assert model._state.media is None and not model._state.cached


@pytest.mark.parametrize("arg", ["vis_dim", "num_latents", "heads", "dim_head", "resampler_depth"])
def test_constructor_rejects_nonpositive_sizes(arg):
    name = "depth" if arg == "resampler_depth" else arg
    with pytest.raises(ValueError, match=name):
        tiny_flamingo("gpt2", **{arg: 0})


@pytest.mark.parametrize("every", [0, 3, True])
def test_constructor_rejects_bad_cross_attn_every_n_layers(every):
    with pytest.raises(ValueError, match="cross_attn_every_n_layers"):
        tiny_flamingo("gpt2", layers=2, cross_attn_every_n_layers=every)
