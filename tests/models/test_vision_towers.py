"""The vision adapters against REAL open_clip and timm models (tiny configs, random init, no download).

open-clip-torch and timm are installed with ``--no-deps``; conftest gives them a torchvision stand-in
that raises on use, so every number compared here comes from their own model code.
"""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import vlmcore

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

# ViT-B-32's layout (patch 32 of 224 -> 7 x 7) at a tiny size: patch 8 of 32 -> 4 x 4 = 16 patches.
TINY_VISION = dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16)
TINY_TEXT = dict(context_length=12, vocab_size=64, width=16, heads=2, layers=1)


def tiny_open_clip(name: str = "ViT-B-32", **kwargs):
    vision = dict(TINY_VISION, **kwargs.pop("vision", {}))
    extra = dict(text_cfg=TINY_TEXT)
    if name.startswith("coca"):
        vision.update(attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=6, output_tokens=True)
        extra = dict(text_cfg=dict(TINY_TEXT, embed_cls=True, output_tokens=True),
                     multimodal_cfg=dict(TINY_TEXT, attn_pooler_heads=2))
    model = open_clip.create_model(name, embed_dim=24, vision_cfg=vision, **extra, **kwargs)
    return model.eval()


def images(n=3, size=32):
    return torch.randn(n, 3, size, size)


def test_open_clip_adapter_equals_encode_image_and_output_tokens():
    model = tiny_open_clip()
    x = images()
    adapter = vlmcore.OpenCLIPVisionAdapter(model.visual)
    # open_clip's own token output: the same weights in a tower built with output_tokens=True.
    with_tokens = tiny_open_clip(vision=dict(output_tokens=True))
    with_tokens.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref_pooled, ref_tokens = with_tokens.visual(x)
        assert adapter.width == 32 and adapter.pooled_width == 24
        assert torch.equal(adapter.pooled(x), model.encode_image(x))
        assert torch.equal(adapter.pooled(x), ref_pooled)
        tokens = adapter(x)
        assert tokens.shape == (3, 16, 32) and torch.equal(tokens, ref_tokens)
        keep = vlmcore.OpenCLIPVisionAdapter(model.visual, prefix_tokens="keep")(x)
        assert keep.shape == (3, 17, 32) and torch.equal(keep[:, 1:], tokens)
        assert torch.allclose(keep[:, 0] @ model.visual.proj, ref_pooled, atol=1e-6)
    # The user's module is untouched: its own encode_image and forward still work.
    assert model.visual.output_tokens is False
    out = model(x, torch.randint(0, 64, (3, 12)))
    assert out["image_features"].shape == (3, 24) if isinstance(out, dict) else out[0].shape == (3, 24)


def test_open_clip_coca_width_is_output_dim_and_feeds_flamingo():
    coca = tiny_open_clip("coca_ViT-B-32")
    adapter = vlmcore.OpenCLIPVisionAdapter(coca.visual)
    x = images(2)
    with torch.no_grad():
        ref_pooled, ref_tokens = coca.visual(x)  # this config has output_tokens=True itself
        tokens = adapter(x)
        assert adapter.width == 24 and tokens.shape == (2, 5, 24) and torch.equal(tokens, ref_tokens)
        assert torch.equal(adapter.pooled(x), ref_pooled)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2, n_positions=16)).eval()
    flamingo = vlmcore.Flamingo(adapter, lm, media_token_id=3, vis_dim=adapter.width, num_latents=2,
                                resampler_depth=1, dim_head=8, heads=2, ff_mult=1)
    lang = torch.randint(4, 32, (2, 6))
    lang[:, 0] = 3
    out = flamingo(x[:, None, None], lang, labels=lang)
    assert torch.isfinite(out.loss)


def test_open_clip_state_dict_round_trip(tmp_path):
    model = tiny_open_clip()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    loaded = tiny_open_clip(pretrained=str(path))  # open_clip's own checkpoint loader
    x = images()
    with torch.no_grad():
        a, b = vlmcore.OpenCLIPVisionAdapter(model.visual), vlmcore.OpenCLIPVisionAdapter(loaded.visual)
        assert torch.equal(a(x), b(x)) and torch.equal(a.pooled(x), b.pooled(x))


def test_open_clip_adapter_errors():
    with pytest.raises(TypeError, match="open_clip VisionTransformer"):
        vlmcore.OpenCLIPVisionAdapter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="prefix_tokens"):
        vlmcore.OpenCLIPVisionAdapter(tiny_open_clip().visual, prefix_tokens="cls")


def tiny_timm(name, **kwargs):
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


TIMM_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_timm_vit_adapter_equals_forward_features(reg_tokens):
    vit = tiny_timm("vit_base_patch16_224", reg_tokens=reg_tokens, **TIMM_VIT)
    x = images()
    with torch.no_grad():
        features = vit.forward_features(x)  # [N, 1 + reg + 16, 32]
        prefix = 1 + reg_tokens
        drop = vlmcore.TimmViTAdapter(vit)
        keep = vlmcore.TimmViTAdapter(vit, prefix_tokens="keep")
        assert drop.width == 32 and torch.equal(drop(x), features[:, prefix:]) and drop(x).shape[1] == 16
        assert torch.equal(keep(x), features)
        assert torch.equal(drop.pooled(x), vit.forward_head(features, pre_logits=True))
        assert torch.equal(drop.pooled(x), vit(x))  # num_classes=0: forward is the pooled vector


@pytest.mark.parametrize("name,kwargs,channels", [
    ("convnext_atto", dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), 32),
    ("resnet10t", dict(), 512),
])
def test_timm_cnn_feature_maps_become_tokens(name, kwargs, channels):
    cnn = tiny_timm(name, **kwargs)
    x = images(2, 64)
    adapter = vlmcore.TimmViTAdapter(cnn)
    with torch.no_grad():
        fmap = cnn.forward_features(x)  # [N, C, 2, 2]
        tokens = adapter(x)
        assert fmap.dim() == 4 and adapter.width == channels
        assert tokens.shape == (2, fmap.shape[2] * fmap.shape[3], channels)
        assert torch.equal(tokens, fmap.flatten(2).transpose(1, 2))
        assert torch.equal(vlmcore.TimmViTAdapter(cnn, prefix_tokens="keep")(x), tokens)
        assert torch.equal(adapter.pooled(x), cnn(x))


def test_timm_state_dict_round_trip(tmp_path):
    vit = tiny_timm("vit_base_patch16_224", **TIMM_VIT)
    path = tmp_path / "timm_vit.pth"
    torch.save(vit.state_dict(), path)
    loaded = tiny_timm("vit_base_patch16_224", **TIMM_VIT)
    timm.models.load_checkpoint(loaded, str(path))  # timm's own loader
    x = images()
    with torch.no_grad():
        a, b = vlmcore.TimmViTAdapter(vit), vlmcore.TimmViTAdapter(loaded)
        assert torch.equal(a(x), b(x)) and torch.equal(a.pooled(x), b.pooled(x))


def test_adapters_do_not_copy_or_change_the_module():
    vit = tiny_timm("vit_base_patch16_224", **TIMM_VIT)
    before = copy.deepcopy(vit.state_dict())
    adapter = vlmcore.TimmViTAdapter(vit)
    assert adapter.model is vit
    adapter(images())
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    visual = tiny_open_clip().visual
    assert vlmcore.OpenCLIPVisionAdapter(visual).visual is visual and visual.output_tokens is False


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_hf_adapter_token_policy(which):
    import transformers

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
               patch_size=8)
    if which == "clip":
        tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg)).eval()
    else:
        tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg)).eval()
    x = images(2, 16)
    with torch.no_grad():
        hidden = tower(pixel_values=x).last_hidden_state
        assert torch.equal(vlmcore.HFVisionAdapter(tower, prefix_tokens="keep")(x), hidden)
        assert torch.equal(vlmcore.HFVisionAdapter(tower)(x), hidden[:, -4:])


def test_builtin_vit_quick_gelu_matches_open_clip_quick_gelu_block():
    """QuickGELU is x * sigmoid(1.702 x), open_clip's own QuickGELU; the state dict is the same for both."""
    x = torch.randn(4, 8)
    assert torch.allclose(vlmcore.vision.QuickGELU()(x), open_clip.transformer.QuickGELU()(x))
    gelu = vlmcore.VisionTransformer(16, 8, 16, 1, 2)
    quick = vlmcore.VisionTransformer(16, 8, 16, 1, 2, act="quick_gelu")
    quick.load_state_dict(gelu.state_dict())
    x = images(2, 16)
    assert not torch.allclose(gelu(x), quick(x))
    with pytest.raises(ValueError, match="act"):
        vlmcore.VisionTransformer(16, 8, 16, 1, 2, act="relu")
