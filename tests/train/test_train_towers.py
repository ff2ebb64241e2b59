"""``model.vision`` types in the trainer: builtin, open_clip, timm, hf (real packages, tiny, no download).

Weights saved by open_clip / timm / transformers load through the config and give identical
features; frozen / LiT options; preprocessing values read without building the tower; CLIP and
Flamingo train a few steps from the YAML with each tower type.
"""

import json
from importlib import resources

import pytest
import torch
from helpers.training import train_argv
from vlmcore.train import main
from vlmcore.train.config import ConfigError, VisionConfig, load_config
from vlmcore.train.tasks.common import build_vision
from vlmcore.train.tasks.towers import build_tower, freeze_vision, vision_preprocess

import vlmcore

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

CONFIGS = resources.files("vlmcore.train") / "configs"
OPEN_CLIP_KWARGS = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8,
                                                    "head_width": 16},
                    "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1}}
TIMM_KWARGS = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                 patch_size=8)


def flow(mapping) -> str:
    """A YAML flow mapping for a dotted override (json is valid YAML)."""
    return json.dumps(mapping)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_clip_vision")
    torch.manual_seed(1)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_VISION)).save_pretrained(str(d))
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(str(d))
    return str(d)


def images(n=2, size=16):
    return torch.randn(n, 3, size, size)


def test_open_clip_checkpoint_loads_with_identical_features(tmp_path):
    original = open_clip.create_model("ViT-B-32", **OPEN_CLIP_KWARGS).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(original.state_dict(), path)
    v = VisionConfig(type="open_clip", name="ViT-B-32", checkpoint=str(path), model_kwargs=OPEN_CLIP_KWARGS)
    tower = build_tower(v).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(tower.pooled(x), original.encode_image(x))
        assert torch.equal(tower(x), vlmcore.OpenCLIPVisionAdapter(original.visual)(x))
    assert tower.width == 32 and tower.pooled_width == 16 and tower(x).shape == (2, 4, 32)
    size, values = vision_preprocess(v)  # without building: what create_model sets on the tower
    assert size == 16 and {k: tuple(values[k]) for k in ("mean", "std")} == {
        k: tuple(tower.visual.preprocess_cfg[k]) for k in ("mean", "std")}


def test_timm_checkpoint_with_a_head_loads_with_identical_features(tmp_path):
    original = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, **TIMM_KWARGS).eval()
    path = tmp_path / "timm_vit.pth"
    torch.save(original.state_dict(), path)  # a timm checkpoint, classifier included
    v = VisionConfig(type="timm", name="vit_base_patch16_224", checkpoint=str(path), model_kwargs=TIMM_KWARGS)
    tower = build_tower(v).eval()
    x = images()
    with torch.no_grad():
        features = original.forward_features(x)
        assert torch.equal(tower(x), features[:, 1:])
        assert torch.equal(tower.pooled(x), original.forward_head(features, pre_logits=True))
    size, values = vision_preprocess(v)
    assert size == 16 and tuple(values["mean"]) == tuple(tower.model.pretrained_cfg["mean"])
    assert values["crop_pct"] == tower.model.pretrained_cfg["crop_pct"]


def test_hf_directory_loads_with_identical_features(hf_dir):
    original = transformers.CLIPVisionModel.from_pretrained(hf_dir).eval()
    tower = build_tower(VisionConfig(type="hf", path=hf_dir, prefix_tokens="keep")).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(tower(x), original(pixel_values=x).last_hidden_state)
    size, values = vision_preprocess(VisionConfig(type="hf", path=hf_dir))
    assert size == 16 and values["mean"] == [0.5, 0.4, 0.3] and values["std"] == [0.2, 0.25, 0.3]


def test_builtin_quick_gelu_from_the_config():
    tower = build_tower(VisionConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2, act="quick_gelu"))
    assert isinstance(tower.blocks[0].mlp[1], vlmcore.vision.QuickGELU) and tower(images()).shape == (2, 5, 16)


def _trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_freeze_and_lit_unlocked_layers(hf_dir):
    cfgs = {
        "builtin": VisionConfig(image_size=16, patch_size=8, width=16, depth=2, heads=2),
        "open_clip": VisionConfig(type="open_clip", name="ViT-B-32", model_kwargs=OPEN_CLIP_KWARGS),
        "timm": VisionConfig(type="timm", name="vit_base_patch16_224", model_kwargs=TIMM_KWARGS),
        "hf": VisionConfig(type="hf", path=hf_dir),
    }
    # transformers 5 drops CLIPVisionModel's ``vision_model`` level; 4.x keeps it: either name is that block.
    last_block = {"builtin": ("blocks.1.",), "open_clip": ("visual.transformer.resblocks.1.",),
                  "timm": ("model.blocks.1.",),
                  "hf": ("model.encoder.layers.1.", "model.vision_model.encoder.layers.1.")}
    for kind, v in cfgs.items():
        v.freeze = True
        tower = build_tower(v)
        freeze_vision(tower, v)
        assert _trainable(tower) == set(), kind  # LiT: the locked image tower
        v.unlocked_layers = 1
        tower = build_tower(v)
        freeze_vision(tower, v)
        trainable = _trainable(tower)
        assert trainable and any(n.startswith(last_block[kind]) for n in trainable), kind
        first_block = tuple(prefix.replace(".1.", ".0.") for prefix in last_block[kind])
        assert not any(n.startswith(first_block) for n in trainable), kind
        assert len(trainable) < len(list(tower.parameters())), kind


def test_vision_config_errors(tmp_path):
    base = (f"task: clip\nout_dir: {tmp_path}/run\nmax_steps: 1\ndata: {{train: [{{shards: x.tar}}]}}\n"
            "tokenizer: {path: t.json}\n")
    cases = [
        ("{type: open_clip}", "model.vision.name: type open_clip needs a model name"),
        ("{type: timm, name: vit_base_patch16_224, init: v.safetensors}", "model.vision.init: only for type builtin"),
        ("{type: hf}", "model.vision.path: type hf needs"),
        ("{type: open_clip, name: 'hf-hub:org/x'}", "hub names download"),
        ("{name: ViT-B-32}", "model.vision.name: not used by type builtin"),
        ("{act: relu}", "model.vision.act"),
        ("{unlocked_layers: 2}", "only meaningful with model.vision.freeze"),
        ("{type: hf, path: d, weights: w}", "weights"),  # unknown key
    ]
    for vision, message in cases:
        path = tmp_path / "c.yaml"
        path.write_text(base + f"model: {{vision: {vision}}}\n")
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config(str(path))
    path.write_text(base + "data: {train: [{shards: x.tar}], preprocess: {scale: [0.5, 2.0]}}\n")
    with pytest.raises(ConfigError, match="data.preprocess: scale"):
        load_config(str(path))
    with pytest.raises(ValueError, match="checkpoint.*does not exist"):
        build_vision(load_config(str(CONFIGS / "openflamingo_3b.yaml")))


@pytest.fixture(scope="module")
def data(shapes_dataset):
    # Not the shared set: the OpenCLIP tower's evaluation must count its 16 held-out pairs.
    return shapes_dataset(n_train=64, n_eval=16, n_docs=16, image_size=32, shard_size=32, seed=4)


def _train(task, data, out, vision, *extra):
    argv = train_argv(task, data, out, "max_steps=2", "save_every=0", "data.train.0.shuffle_buffer=0", *extra,
                      eval_batch_size=None, train_batch_size=4, context_length=12,
                      vision=f"model.vision={flow(vision)}")
    if task == "flamingo":
        pairs = {"kind": "pairs", "shards": f"{data}/train-*.tar", "batch_size": 4, "shuffle_buffer": 0}
        argv += [f"data.train=[{flow(pairs)}]",
                 "model.lm={config: {model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2, n_positions: 64}}",
                 "model.flamingo={num_latents: 2, resampler_depth: 1, dim_head: 8, heads: 2, ff_mult: 1}"]
    else:
        argv += ["model.clip={embed_dim: 16, text: {width: 16, depth: 1, heads: 2}}"]
    main(argv)
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] == s["loss"] for s in steps)
    return steps


TOWERS = {
    "builtin": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2, "act": "quick_gelu"},
    "open_clip": {"type": "open_clip", "name": "ViT-B-32", "model_kwargs": OPEN_CLIP_KWARGS},
    "timm": {"type": "timm", "name": "vit_base_patch16_224", "model_kwargs": TIMM_KWARGS},
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["builtin", "open_clip", "timm", "hf"])
def test_clip_trains_with_each_tower(kind, data, hf_dir, tmp_path):
    vision = TOWERS.get(kind) or {"type": "hf", "path": hf_dir}
    extra = []
    if kind == "open_clip":
        # The OpenCLIP default (RandomResizedCrop(0.9, 1.0), the tower's mean / std), decoded in a worker process.
        extra = ["data.preprocess={train: random_resized_crop}", "data.num_workers=1",
                 f"data.eval={{shards: '{data}/eval-000000.tar', batch_size: 16}}"]
    _train("clip", data, tmp_path / kind, vision, *extra)
    if kind == "open_clip":  # evaluated with the eval transform (resize + center crop)
        with open(tmp_path / kind / "eval.json", encoding="utf-8") as f:
            result = json.load(f)
        assert result["step"] == 2 and 0 <= result["zero_shot_top1"] <= 1 and result["eval_samples"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["open_clip", "timm", "hf"])
def test_flamingo_trains_with_each_frozen_adapter_tower(kind, data, hf_dir, tmp_path):
    vision = dict(TOWERS.get(kind) or {"type": "hf", "path": hf_dir}, freeze=True)
    if kind == "timm":
        vision.update(unlocked_layers=1)  # LiT-style: the last block still trains
    _train("flamingo", data, tmp_path / kind, vision)
