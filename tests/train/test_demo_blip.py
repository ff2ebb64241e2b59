"""The pieces of the BLIP / CapFilt demo (train/demo_blip.py) that its numbers rest on: the caption
corruption and the class image ids, the filter scoring (drop precision / recall, ROC AUC) and the
grouped held-out retrieval. The demo itself runs ~5 min (README); it is not run here."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import torch
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.pipeline import decode_image, read_tar
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tools import demo_blip
from vlmcore.train.tools.shape_drawing import CLASSNAMES, COLOURS, SHAPES

from vlmcore.blip import blip_retrieval_metrics, build_blip, load_blip, save_blip


@pytest.fixture(scope="module")
def data(shapes_dataset):
    # Not the shared set: the corruption counts are checked against its 120 training pairs (2 shards of 60).
    return shapes_dataset(n_train=120, n_eval=48, n_docs=1, image_size=16, shard_size=60, seed=5)


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    text = BlipText(Tokenizer(str(data / "tokenizer.json"), 16))
    spec = {"vision": {"kind": "vit", "image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            "text": text.med_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=32, encoder_width=32).__dict__,
            "embed_dim": 16, "momentum": None, "queue_size": 0}
    torch.manual_seed(0)
    return save_blip(build_blip(spec).eval(), str(tmp_path_factory.mktemp("blip_ckpt")))


def _train_shards(data):
    return sorted(str(data / f) for f in os.listdir(data) if f.startswith("train-"))


def test_corruption_swaps_one_word_and_ids_are_the_image_class(data, tmp_path):
    shards = _train_shards(data)
    counts = demo_blip.corrupt_shards(shards, str(tmp_path / "noisy"), noise=0.5, seed=1)
    assert counts["samples"] == 120 and 35 <= counts["corrupted"] <= 85
    originals = {s["__key__"]: s for shard in shards for s in read_tar(shard)}
    seen = 0
    for shard in shards:
        for sample in read_tar(str(tmp_path / "noisy" / os.path.basename(shard))):
            meta = json.loads(sample["json"])
            before = originals[sample["__key__"]]
            assert sample["png"] == before["png"]
            assert meta["image_id"] == meta["label"] == CLASSNAMES.index(f"{meta['colour']} {meta['shape']}")
            old, new = before["txt"].decode().split(), sample["txt"].decode().split()
            changed = [(a, b) for a, b in zip(old, new) if a != b]
            assert len(old) == len(new) and len(changed) == (1 if meta["corrupted"] else 0)
            if changed:  # the image's own colour or shape became another one
                wrong_from, wrong_to = changed[0]
                assert wrong_from in (meta["colour"], meta["shape"]) and wrong_to != wrong_from
                assert wrong_to in COLOURS or wrong_to in SHAPES
            seen += 1
    assert seen == 120
    clean = demo_blip.corrupt_shards(shards[:1], str(tmp_path / "clean"), noise=0.0)
    assert clean["corrupted"] == 0


def test_roc_auc_is_the_mann_whitney_statistic():
    assert demo_blip.roc_auc([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0
    assert demo_blip.roc_auc([0.1], [0.9, 0.8]) == 0.0
    # hand count: pairs (0.5,0.5) tie = 0.5, (0.5,0.1) = 1, (0.9,0.5) = 1, (0.9,0.1) = 1 -> 3.5 / 4
    assert demo_blip.roc_auc([0.5, 0.9], [0.5, 0.1]) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="both sides"):
        demo_blip.roc_auc([], [0.3])


def _capfilt_like_output(noisy_dir, out_dir, kept_keys):
    """Output shards as vlmcore-capfilt writes them, with the web caption kept for ``kept_keys``;
    images whose captions were all dropped are absent."""
    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(noisy_dir)):
        with tarfile.open(os.path.join(out_dir, name), "w") as tar:
            for sample in read_tar(os.path.join(noisy_dir, name)):
                if sample["__key__"] not in kept_keys:
                    continue
                record = {"captions": [{"text": sample["txt"].decode(), "source": "web", "kept": True}]}
                for ext, payload in (("png", sample["png"]), ("txt", sample["txt"]),
                                     ("json", json.dumps(record).encode())):
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_filter_quality_counts_drops_against_the_corruption(data, checkpoint, tmp_path):
    noisy_dir = str(tmp_path / "noisy")
    demo_blip.corrupt_shards(_train_shards(data), noisy_dir, noise=0.4, seed=2)
    noisy = sorted(os.path.join(noisy_dir, f) for f in os.listdir(noisy_dir))
    corrupted = {s["__key__"] for p in noisy for s in read_tar(p) if json.loads(s["json"])["corrupted"]}
    keys = sorted(s["__key__"] for p in noisy for s in read_tar(p))
    clean = [k for k in keys if k not in corrupted]
    dropped = set(sorted(corrupted)[: len(corrupted) // 2]) | set(clean[:10])  # half the noise + 10 clean
    _capfilt_like_output(noisy_dir, str(tmp_path / "capfilt"), set(keys) - dropped)
    quality = demo_blip.filter_quality(noisy, str(tmp_path / "capfilt"), checkpoint, str(data / "tokenizer.json"))
    half = len(corrupted) // 2
    assert quality["web_dropped"] == half + 10 and quality["corrupted"] == len(corrupted)
    assert quality["dropped_and_corrupted"] == half
    assert quality["drop_precision"] == pytest.approx(half / (half + 10))
    assert quality["drop_recall"] == pytest.approx(half / len(corrupted))
    assert 0.0 <= quality["filter_auc"] <= 1.0


def test_grouped_retrieval_averages_within_groups_of_one_image_per_class(data, checkpoint):
    eval_shard = str(data / "eval-000000.tar")
    got = demo_blip.grouped_retrieval(checkpoint, eval_shard, str(data / "tokenizer.json"), groups=2, k_test=4)
    model = load_blip(checkpoint, momentum=None).eval()
    text = BlipText(Tokenizer(str(data / "tokenizer.json"), 16))
    samples = list(read_tar(eval_shard))
    expected = {}
    for g in range(2):
        group = samples[24 * g: 24 * (g + 1)]
        assert sorted(json.loads(s["json"])["label"] for s in group) == list(range(24))  # one image per class
        ids, mask = text.encode([s["txt"].decode() for s in group])
        images = torch.stack([decode_image(s["png"], 16) for s in group])
        with torch.no_grad():
            metrics = blip_retrieval_metrics(*model.retrieval_scores(images, ids, mask, k_test=4), ks=(1, 5))
        for key, value in metrics.items():
            expected[key] = expected.get(key, 0.0) + value / 2
    assert got == pytest.approx(expected)
    with pytest.raises(ValueError, match="fewer than 3 groups"):
        demo_blip.grouped_retrieval(checkpoint, eval_shard, str(data / "tokenizer.json"), groups=3)
