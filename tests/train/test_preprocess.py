"""Preprocessing (PIL + torch only): RandomResizedCrop / resize + center crop, the tower's mean / std."""

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from vlmcore.train.data.pipeline import decode_image
from vlmcore.train.data.preprocess import OPENAI_MEAN, OPENAI_STD, ImageTransform, build_transforms, tower_preprocess


def picture(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def normalized(image, mean, std):
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_default_decode_is_the_squash_resize_with_openai_stats():
    image = picture(40, 24)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 16)
    expected = normalized(image.resize((16, 16), Image.BICUBIC), OPENAI_MEAN, OPENAI_STD)
    assert out.shape == (3, 16, 16) and torch.equal(out, expected)


@pytest.mark.parametrize("crop_pct,resized", [(1.0, (26, 16)), (0.875, (30, 18))])
def test_eval_resizes_the_short_side_then_center_crops(crop_pct, resized):
    image = picture(40, 24)
    t = ImageTransform(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=crop_pct)
    big = image.resize(resized, Image.BICUBIC)
    left, top = int(round((resized[0] - 16) / 2)), int(round((resized[1] - 16) / 2))
    expected = normalized(big.crop((left, top, left + 16, top + 16)), (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(t(image), expected)
    tall = picture(20, 50)  # the other orientation: width is the short side
    assert t(tall).shape == (3, 16, 16)


def test_random_resized_crop_boxes():
    t = ImageTransform(16, is_train=True)
    width, height = 60, 45
    for seed in range(200):
        left, top, w, h = t.crop_box(width, height, random.Random(seed))
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        # area in scale (0.9, 1.0) and ratio in (3/4, 4/3), up to the rounding of w and h
        assert 0.9 * width * height - (w + h) - 1 <= w * h <= width * height
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    image = picture(width, height)
    out = t(image, random.Random(5))
    left, top, w, h = t.crop_box(width, height, random.Random(5))
    expected = normalized(image.resize((16, 16), Image.BICUBIC, box=(left, top, left + w, top + h)),
                          OPENAI_MEAN, OPENAI_STD)
    assert torch.equal(out, expected) and torch.equal(t(image, random.Random(5)), out)  # seeded: deterministic
    assert not torch.equal(t(image, random.Random(6)), out)
    with pytest.raises(ValueError, match="rng"):
        t(image)
    # A very wide image cannot hold the ratio range: the fallback is a center crop at the clamped ratio.
    left, top, w, h = t.crop_box(400, 20, random.Random(0))
    assert (h, w) == (20, round(20 * 4 / 3)) and left == (400 - w) // 2


def test_transform_option_errors():
    for kwargs, name in [(dict(mean=(0.5, 0.5)), "mean"), (dict(std=(0.5, 0.0, 0.5)), "std"),
                         (dict(train="crop"), "train"), (dict(resize_mode="longest"), "resize_mode"),
                         (dict(scale=(0.5, 1.2)), "scale"), (dict(crop_pct=0), "crop_pct"),
                         (dict(interpolation="box"), "interpolation")]:
        with pytest.raises(ValueError, match=name):
            ImageTransform(16, **kwargs)


def test_open_clip_tower_values():
    open_clip = pytest.importorskip("open_clip")
    vision = dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16)
    text = dict(context_length=8, vocab_size=32, width=16, heads=2, layers=1)
    model = open_clip.create_model("ViT-B-32", embed_dim=16, vision_cfg=vision, text_cfg=text)
    cfg = tower_preprocess("open_clip", model)
    assert cfg["size"] == 32 and tuple(cfg["mean"]) == open_clip.OPENAI_DATASET_MEAN
    assert tuple(cfg["std"]) == open_clip.OPENAI_DATASET_STD and cfg["interpolation"] == "bicubic"
    siglip_like = open_clip.create_model("ViT-B-32", embed_dim=16, vision_cfg=vision, text_cfg=text,
                                         force_preprocess_cfg=dict(mean=(0.5,) * 3, std=(0.5,) * 3))
    train, evaluate = build_transforms(32, tower_preprocess("open_clip", siglip_like), {})
    assert train.mean == (0.5,) * 3 and train.std == (0.5,) * 3 and train.scale == (0.9, 1.0)
    assert train.is_train and not evaluate.is_train and evaluate.size == 32
    override, _ = build_transforms(32, tower_preprocess("open_clip", model), {"mean": [0.1, 0.2, 0.3], "std": None})
    assert override.mean == (0.1, 0.2, 0.3) and override.std == OPENAI_STD


def test_timm_tower_values():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=1, num_heads=2)
    expected = timm.data.resolve_data_config({}, model=vit)  # timm's own resolution of its pretrained_cfg
    cfg = tower_preprocess("timm", vit)
    assert tuple(cfg["mean"]) == expected["mean"] and tuple(cfg["std"]) == expected["std"]
    assert cfg["crop_pct"] == expected["crop_pct"] == 0.9 and cfg["interpolation"] == expected["interpolation"]
    _, evaluate = build_transforms(32, cfg, {})
    assert evaluate.size == 32 and evaluate.crop_pct == 0.9  # eval: short side to floor(32 / 0.9) = 35, crop 32
    assert math.floor(32 / 0.9) == 35


def test_hf_image_processor_values(tmp_path):
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16}, image_mean=[0.1, 0.2, 0.3],
                       image_std=[0.4, 0.5, 0.6]).save_pretrained(str(tmp_path))
    cfg = tower_preprocess("hf", path=str(tmp_path))
    assert cfg == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bicubic", "size": 16,
                   "crop_pct": 16 / 18}
    _, evaluate = build_transforms(16, cfg, {})
    image = picture(36, 27)
    big = image.resize((24, 18), Image.BICUBIC)  # short side 27 -> 18, as the HF processor resizes
    expected = normalized(big.crop((4, 1, 20, 17)), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert torch.equal(evaluate(image), expected)
    assert tower_preprocess("hf", path=str(tmp_path / "none")) == {}
    assert tower_preprocess("builtin") == {"mean": OPENAI_MEAN, "std": OPENAI_STD}


def test_image_decoder_crops_are_a_function_of_seed_url_and_key():
    """What makes a resumed run (which skips samples undecoded) crop exactly as the uninterrupted one."""
    from vlmcore.train.tasks.common import ImageDecoder

    buf = io.BytesIO()
    picture(48, 40).save(buf, format="PNG")
    data = buf.getvalue()
    train = ImageTransform(16, is_train=True)
    sample = {"__url__": "pipe:cat a.tar", "__key__": "000001"}
    first = ImageDecoder(train, seed=3)(data, sample)
    assert torch.equal(ImageDecoder(train, seed=3)(data, dict(sample)), first)  # a fresh decoder, same crop
    assert not torch.equal(ImageDecoder(train, seed=3)(data, {**sample, "__key__": "000002"}), first)
    assert not torch.equal(ImageDecoder(train, seed=4)(data, sample), first)
    evaluate = ImageDecoder(train.for_eval(), seed=3)
    assert torch.equal(evaluate(data, sample), train.for_eval()(Image.open(io.BytesIO(data))))
