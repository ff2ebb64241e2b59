"""Whole CLIP / SigLIP models from open_clip and transformers, and exported back (vlmcore.clip.convert).

Every peer is the REAL package's model (random init, no download; open_clip with the torchvision
stand-in of conftest). Features and logits must match the peer's own within 1e-5 in fp32.
open_clip's SigLIP models build their image tower with timm, which does not convert: SigLIP is
compared against transformers' ``SiglipModel``.
"""

import json

import pytest
import torch
from helpers.numerics import assert_close
from helpers.training import train_argv
from safetensors.torch import load_file, save_file

import vlmcore
from vlmcore.checkpoint_keys import CheckpointKeysError
from vlmcore.clip import clip_from_hf, clip_from_open_clip, export_hf, export_open_clip

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-5)
TINY_VISION = dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16)
TINY_TEXT = dict(context_length=12, vocab_size=64, width=16, heads=2, layers=2)


def tiny_open_clip(name="ViT-B-32", **text):
    torch.manual_seed(0)
    model = open_clip.create_model(name, embed_dim=24, vision_cfg=TINY_VISION, text_cfg=dict(TINY_TEXT, **text))
    return model.eval()


def clip_tokens(n, context, vocab, eot=None, seed=1):
    """OpenCLIP-style rows: random ids, one end token (default the largest id) at a random place, zero padding."""
    g = torch.Generator().manual_seed(seed)
    eot = vocab - 1 if eot is None else eot
    tokens = torch.randint(3, vocab - 1, (n, context), generator=g)
    tokens[tokens == eot] = 3
    for i, end in enumerate(torch.randint(2, context, (n,), generator=g).tolist()):
        tokens[i, end] = eot
        tokens[i, end + 1:] = 0
    return tokens


def images(n=3, size=32, seed=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_clip(ours, image_features, text_features, logits, x, tokens, name):
    """Our normalized features and logits (raw ``s cos`` / ``s cos + b``) against the peer's."""
    with torch.no_grad():
        img, txt = ours.encode_image(x), ours.encode_text(tokens)
        raw = ours.logit_scale() * img @ txt.T
        if ours.loss == "siglip":
            raw = raw + ours.criterion.logit_bias
    assert_close(img, image_features, **TOL, name=f"{name} image features")
    assert_close(txt, text_features, **TOL, name=f"{name} text features")
    assert_close(raw, logits, **TOL, name=f"{name} logits")


def open_clip_outputs(peer, x, tokens):
    with torch.no_grad():
        return (peer.encode_image(x, normalize=True), peer.encode_text(tokens, normalize=True),
                peer.get_logits(x, tokens)[0])


def hf_outputs(peer, x, tokens):
    with torch.no_grad():
        out = peer(input_ids=tokens, pixel_values=x)
    return out.image_embeds, out.text_embeds, out.logits_per_image


def tiny_hf_clip(eos_token_id=63, act="quick_gelu"):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, eos_token_id=eos_token_id,
                         bos_token_id=1, pad_token_id=0, hidden_act=act),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=24)
    return transformers.CLIPModel(config).eval()


def tiny_hf_siglip():
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, projection_size=32,
                         bos_token_id=1, eos_token_id=63, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # away from the init values, so that a swapped scale / bias would show
        model.logit_scale.fill_(1.3)
        model.logit_bias.fill_(-2.5)
    return model


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu"])
def test_open_clip_vit_b_32_equals_open_clip(name):
    peer = tiny_open_clip(name)
    ours = clip_from_open_clip(peer)
    assert ours.visual.act == ours.text.act == ("quick_gelu" if "quickgelu" in name else "gelu")
    x, tokens = images(), clip_tokens(3, 12, 64)
    assert_same_clip(ours, *open_clip_outputs(peer, x, tokens), x, tokens, name)


def test_open_clip_bidirectional_last_token_text_with_projection_bias():
    peer = tiny_open_clip(no_causal_mask=True, pool_type="last", proj_bias=True)
    ours = clip_from_open_clip(peer)
    assert not ours.text.causal and ours.text.pool == "last" and ours.text_projection.bias is not None
    x, tokens = images(), clip_tokens(3, 12, 64)
    assert_same_clip(ours, *open_clip_outputs(peer, x, tokens), x, tokens, "bidirectional")


@pytest.mark.parametrize("eos_token_id", [62, 2])
def test_hf_clip_equals_clip_model(eos_token_id):
    """eos id 62: pooled at the first EOS token; 2: transformers' legacy rule, the largest id."""
    peer = tiny_hf_clip(eos_token_id)
    ours = clip_from_hf(peer)
    assert ours.text.eot_token_id == (None if eos_token_id == 2 else 62)
    x, tokens = images(), clip_tokens(3, 12, 64, eot=62)
    tokens[0, 1] = 63  # a row whose largest id is not the EOS: argmax and first-EOS pooling differ there
    assert_same_clip(ours, *hf_outputs(peer, x, tokens), x, tokens, f"CLIPModel eos {eos_token_id}")


def test_hf_siglip_equals_siglip_model():
    peer = tiny_hf_siglip()
    ours = clip_from_hf(peer)
    assert ours.loss == "siglip" and ours.visual.pool == "map" and ours.visual.class_embedding is None
    x, tokens = images(), clip_tokens(3, 12, 64)
    assert_same_clip(ours, *hf_outputs(peer, x, tokens), x, tokens, "SiglipModel")
    assert_close(ours.pair_scores(ours.encode_image(x) @ ours.encode_text(tokens).T),
                 torch.sigmoid(hf_outputs(peer, x, tokens)[2]), **TOL, name="SigLIP pair probabilities")


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu"])
def test_export_open_clip_round_trip(tmp_path, name):
    ours = clip_from_open_clip(tiny_open_clip(name))
    with torch.no_grad():  # weights that are not the peer's init
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_open_clip(ours, str(tmp_path))
    # open_clip builds the architecture from the written config alone and loads the weights strictly.
    peer = open_clip.create_model(f"local-dir:{tmp_path}", load_weights=False).eval()
    peer.load_state_dict(load_file(str(tmp_path / "open_clip_model.safetensors")), strict=True)
    x, tokens = images(), clip_tokens(3, 12, 64)
    assert_same_clip(ours, *open_clip_outputs(peer, x, tokens), x, tokens, "open_clip export")
    again = clip_from_open_clip(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_export_hf_round_trip(tmp_path, family):
    peer = tiny_hf_siglip() if family == "siglip" else tiny_hf_clip()
    ours = clip_from_hf(peer)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_hf(ours, str(tmp_path))
    cls = transformers.SiglipModel if family == "siglip" else transformers.CLIPModel
    loaded, info = cls.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x, tokens = images(), clip_tokens(3, 12, 64)
    assert_same_clip(ours, *hf_outputs(loaded.eval(), x, tokens), x, tokens, f"hf export {family}")
    again = clip_from_hf(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_missing_and_unexpected_keys_are_reported_together(tmp_path):
    peer = tiny_open_clip()
    state = dict(peer.state_dict())
    del state["transformer.resblocks.1.mlp.c_fc.bias"]
    state["visual.extra.weight"] = torch.zeros(1)
    state["text_projection"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointKeysError) as info:
        clip_from_open_clip(peer, pretrained=str(tmp_path / "broken.safetensors"))
    message = str(info.value)
    assert "transformer.resblocks.1.mlp.c_fc.bias" in message and "visual.extra.weight" in message
    assert "text_projection: (3, 3) vs ours (24, 16)" in message
    assert info.value.missing == ["transformer.resblocks.1.mlp.c_fc.bias"]
    # An explicit allow-list lets the named keys through (the shape mismatch still fails).
    del state["text_projection"]
    state["text_projection"] = peer.text_projection.detach()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "allowed.safetensors"))
    ours = clip_from_open_clip(peer, pretrained=str(tmp_path / "allowed.safetensors"),
                               allow_missing=["*.mlp.c_fc.bias"], allow_unexpected=["visual.extra.*"])
    assert torch.equal(ours.text.blocks[0].mlp[0].weight, peer.transformer.resblocks[0].mlp.c_fc.weight)


def test_exports_refuse_what_the_peer_cannot_express(tmp_path):
    siglip = clip_from_hf(tiny_hf_siglip())
    with pytest.raises(ValueError, match="export to open_clip: the image tower must pool at its CLS token"):
        export_open_clip(siglip, str(tmp_path / "a"))
    adapter = vlmcore.CLIP(24, vision_encoder=vlmcore.OpenCLIPVisionAdapter(tiny_open_clip().visual),
                           vocab_size=64, context_length=12, text_width=16, text_depth=1, text_heads=2)
    with pytest.raises(ValueError, match="OpenCLIPVisionAdapter, not vlmcore's VisionTransformer"):
        export_hf(adapter, str(tmp_path / "b"))
    mixed = clip_from_hf(tiny_hf_clip())
    mixed.text.pool = "last"
    with pytest.raises(ValueError, match=r"text_pool='last' \(needs 'eot'\)"):
        export_hf(mixed, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="open_clip has no model 'ViT-Nope'"):
        clip_from_open_clip("ViT-Nope", pretrained=str(tmp_path / "x.safetensors"))


@pytest.mark.slow
def test_real_sizes_vit_b_32_and_siglip_b_16():
    """The real ViT-B-32 (QuickGELU, OpenAI's) and SigLIP ViT-B/16 shapes, random weights."""
    torch.manual_seed(0)
    peer = open_clip.create_model("ViT-B-32-quickgelu").eval()
    ours = clip_from_open_clip(peer)
    x, tokens = images(2, 224), clip_tokens(2, 77, 49408)
    assert_same_clip(ours, *open_clip_outputs(peer, x, tokens), x, tokens, "ViT-B-32 real size")
    config = transformers.SiglipConfig(text_config=dict(vocab_size=32000, max_position_embeddings=64),
                                       vision_config=dict(image_size=224, patch_size=16))
    siglip = transformers.SiglipModel(config).eval()
    ours = clip_from_hf(siglip)
    x, tokens = images(2, 224), clip_tokens(2, 64, 32000)
    assert_same_clip(ours, *hf_outputs(siglip, x, tokens), x, tokens, "SigLIP B/16 real size")


# --- model.clip.init / model.siglip.init: the whole model from the config (tiny peers written here)

def word_tokenizer(data, context):
    from vlmcore.train.data.tokenizer import Tokenizer

    return Tokenizer(str(data / "tokenizer.json"), context, media_tokens=False)


def write_open_clip_dir(out, tok, context):
    """A tiny open_clip CLIP on the shapes word vocabulary (pooled at its <eos>), as open_clip's own files."""
    from safetensors.torch import save_file

    cfg = dict(embed_dim=24, vision_cfg=TINY_VISION,
               text_cfg=dict(TINY_TEXT, context_length=context, vocab_size=tok.vocab_size, pool_type="eos",
                             eos_id=tok.eos_token_id))
    torch.manual_seed(0)
    peer = open_clip.create_model("ViT-B-32", **cfg).eval()
    out.mkdir()
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(cfg, quick_gelu=False)}))
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return peer


def write_hf_siglip_dir(out, tok, context):
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=context, projection_size=32,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8))
    peer = transformers.SiglipModel(config).eval()
    peer.save_pretrained(str(out))
    return peer


def init_argv(task_name, data, out, init, context, *extra):
    """vlmcore-train arguments of a run from ``model.<task>.init`` (the tower's size from the checkpoint)."""
    return train_argv(task_name, data, out, f"model.{task_name}={{init: {init}}}", *extra, context_length=context,
                      vision="model.vision={image_size: 32}", train_batch_size=8)


def eval_batch(task, data, n=6):
    import tarfile

    samples = {}
    with tarfile.open(data / "eval-000000.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key, "__url__": "eval"})[ext] = tar.extractfile(member).read()
    encoded = [task.eval_encoder()(s) for s in list(samples.values())[:n]]
    return torch.stack([e["images"] for e in encoded]), torch.stack([e["tokens"] for e in encoded])


@pytest.mark.parametrize("task_name", ["clip", "siglip"])
def test_config_init_builds_the_peer_model(data, tmp_path, task_name):
    """The task's model from ``model.<task>.init`` scores the eval pairs exactly as the peer does."""
    from vlmcore.train.config import load_config
    from vlmcore.train.tasks import get_task

    context = 12
    tok = word_tokenizer(data, context)
    if task_name == "clip":
        peer = write_open_clip_dir(tmp_path / "peer", tok, context)
        init = f"{{format: open_clip, path: '{tmp_path / 'peer'}'}}"
    else:
        peer = write_hf_siglip_dir(tmp_path / "peer", tok, context)
        init = f"{{format: hf, path: '{tmp_path / 'peer'}'}}"
    argv = init_argv(task_name, data, tmp_path / "run", init, context)
    cfg = load_config(argv[1], argv[2:])
    task = get_task(task_name)(cfg, tok)
    model = task.build_model(torch.float32).eval()
    x, tokens = eval_batch(task, data)
    peer_out = open_clip_outputs(peer, x, tokens) if task_name == "clip" else hf_outputs(peer, x, tokens)
    assert_same_clip(model, *peer_out, x, tokens, f"{task_name} from config")
    # The task's exporters (what vlmcore-export calls) write the peer's files; SigLIP has no open_clip ViT form.
    exporters = task.peer_exporters()
    assert set(exporters) == {"open_clip", "hf"}
    exporters["hf"](model, str(tmp_path / "hf"))
    assert torch.equal(clip_from_hf(str(tmp_path / "hf")).encode_text(tokens), model.encode_text(tokens))
    if task_name == "siglip":
        with pytest.raises(ValueError, match="export to open_clip"):
            exporters["open_clip"](model, str(tmp_path / "oc"))
    else:
        exporters["open_clip"](model, str(tmp_path / "oc"))
        assert_same_clip(clip_from_open_clip(str(tmp_path / "oc")), *peer_out, x, tokens, "re-exported")


@pytest.mark.slow
def test_clip_run_from_open_clip_init_trains(data, tmp_path):
    from vlmcore.train import main

    context, peer_dir = 12, tmp_path / "peer"
    write_open_clip_dir(peer_dir, word_tokenizer(data, context), context)
    init = f"{{format: open_clip, path: '{peer_dir}'}}"
    results = main(init_argv("clip", data, tmp_path / "run", init, context, "max_steps=3", "save_every=0",
                             "eval_every=3"))
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert results["eval_samples"] == 48 and "i2t_R@1" in results


def test_config_init_reports_a_missing_key_and_conflicting_keys(data, tmp_path):
    from vlmcore.train import ConfigError
    from vlmcore.train.config import load_config
    from vlmcore.train.tasks import get_task

    context, peer_dir = 12, tmp_path / "peer"
    tok = word_tokenizer(data, context)
    write_open_clip_dir(peer_dir, tok, context)
    init = f"{{format: open_clip, path: '{peer_dir}'}}"
    state = load_file(str(peer_dir / "open_clip_model.safetensors"))
    del state["visual.ln_post.bias"]
    save_file(state, str(peer_dir / "open_clip_model.safetensors"))
    argv = init_argv("clip", data, tmp_path / "broken", init, context)
    task = get_task("clip")(load_config(argv[1], argv[2:]), tok)
    with pytest.raises(CheckpointKeysError, match=r"missing 1 keys: visual\.ln_post\.bias"):
        task.build_model(torch.float32)
    # Keys the checkpoint decides, set next to init: one ConfigError naming both.
    argv = init_argv("clip", data, tmp_path / "clash", init, context, "model.clip.text.width=32",
                     "model.vision.depth=3")
    with pytest.raises(ConfigError) as info:
        load_config(argv[1], argv[2:])
    assert "model.clip.text.width: conflicts with model.clip.init" in str(info.value)
    assert "model.vision.depth: conflicts with model.clip.init" in str(info.value)
