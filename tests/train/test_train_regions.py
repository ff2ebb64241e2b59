"""Region-feature data for ViLBERT / VL-BERT: KEY.npz decoding and validation, padding, and the
shapes region variant (``vlmcore-make-shapes --regions``)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from vlmcore.train.data.pipeline import BadSample, read_tar
from vlmcore.train.data.regions import decode_regions, pad_regions
from vlmcore.train.tools.make_shapes import console_main
from vlmcore.train.tools.region_shapes import (
    BACKGROUND_CLASS,
    NUM_REGION_CLASSES,
    make_region_shapes,
    npz_bytes,
    regions_complete,
)
from vlmcore.train.tools.shape_drawing import CLASSNAMES


def _npz(regions=3, dim=6, classes=4, **override):
    arrays = dict(features=np.random.rand(regions, dim).astype(np.float16),
                  boxes=np.array([[0, 0, 10, 20], [5, 5, 40, 30], [0, 10, 40, 40]][:regions], dtype=np.float32),
                  image_w=np.int32(40), image_h=np.int32(40),
                  class_probs=np.full((regions, classes), 1 / classes, dtype=np.float32))
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_decode_normalizes_boxes_and_prepends_the_global_region():
    out = decode_regions(_npz(), max_regions=10, feature_dim=6, num_classes=4)
    assert out["region_features"].shape == (4, 6) and out["region_boxes"].shape == (4, 5)
    torch.testing.assert_close(out["region_boxes"][0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(out["region_boxes"][1], torch.tensor([0.0, 0.0, 0.25, 0.5, 0.125]))
    torch.testing.assert_close(out["region_features"][0], out["region_features"][1:].mean(0))
    capped = decode_regions(_npz(), max_regions=2, feature_dim=6)
    assert capped["region_features"].shape == (2, 6)  # global + the first region


@pytest.mark.parametrize("override, message", [
    ({"features": None}, "no array features"),
    ({"features": np.zeros((3, 5))}, r"features must be \[R, 6\]"),
    ({"boxes": np.array([[0, 0, 10, 20], [5, 5, 41, 30], [0, 10, 40, 40]])}, "boxes outside"),
    ({"boxes": np.array([[10, 0, 5, 20], [5, 5, 40, 30], [0, 10, 40, 40]])}, "x2 < x1"),
    ({"class_probs": np.zeros((2, 4))}, "class_probs must be"),
    ({"features": np.full((3, 6), np.nan)}, "non-finite"),
    ({"image_w": np.int32(0)}, "image_w"),
])
def test_bad_npz_is_a_bad_sample(override, message):
    with pytest.raises(BadSample, match=message):
        decode_regions(_npz(**override), max_regions=10, feature_dim=6, num_classes=4)


def test_corrupt_npz_is_a_bad_sample():
    with pytest.raises(BadSample, match="npz does not load"):
        decode_regions(b"not an archive", max_regions=10, feature_dim=6)


def test_pad_regions_masks_the_padding():
    out = pad_regions(decode_regions(_npz(), max_regions=10, feature_dim=6), 7)
    assert out["region_features"].shape == (7, 6)
    assert out["region_mask"].tolist() == [True] * 4 + [False] * 3
    assert (out["region_features"][4:] == 0).all()


def test_region_shapes_dataset(tmp_path):
    summary = make_region_shapes(str(tmp_path), n_train=30, n_eval=24, feature_dim=16, shard_size=20)
    assert regions_complete(str(tmp_path)) and summary["num_classes"] == NUM_REGION_CLASSES
    samples = [s for path in sorted(tmp_path.glob("regions-train-*.tar")) for s in read_tar(str(path))]
    assert len(samples) == 30
    for sample in samples[:10]:
        meta = json.loads(sample["json"])
        out = decode_regions(sample["npz"], max_regions=16, feature_dim=16, num_classes=NUM_REGION_CLASSES)
        probs = out["class_probs"]
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)), atol=1e-5, rtol=0)
        assert int(probs[1].argmax()) == meta["label"]  # region 1 = the drawn object's box
        assert CLASSNAMES[meta["label"]] in sample["txt"].decode()  # '<colour> <shape>' in every template
        assert (out["region_features"] >= 0).all()
    # Some extra boxes are background: the detector stand-in gives them the background class.
    classes = {int(c) for s in samples
               for c in decode_regions(s["npz"], max_regions=16, feature_dim=16)["class_probs"].argmax(-1)}
    assert BACKGROUND_CLASS in classes
    assert len(list(tmp_path.glob("regions-eval-*.tar"))) == 2


def test_same_class_regions_are_closer_than_other_classes(tmp_path):
    """The crop projection carries the colour/shape signal a model needs (object regions cluster by class)."""
    make_region_shapes(str(tmp_path), n_train=96, n_eval=1, feature_dim=64, shard_size=1000)
    feats, labels = [], []
    for s in read_tar(str(tmp_path / "regions-train-000000.tar")):
        feats.append(decode_regions(s["npz"], max_regions=16, feature_dim=64)["region_features"][1])
        labels.append(json.loads(s["json"])["label"])
    feats = torch.nn.functional.normalize(torch.stack(feats), dim=-1)
    labels = torch.tensor(labels)
    sim = feats @ feats.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    assert sim[same & off_diagonal].mean() > sim[~same].mean() + 0.05


def test_make_shapes_cli_regions(tmp_path, capsys):
    console_main(["--out", str(tmp_path), "--regions", "--n", "5", "--n-eval", "3", "--feature-dim", "8"])
    assert json.loads(capsys.readouterr().out)["feature_dim"] == 8
    assert regions_complete(str(tmp_path))


def test_npz_bytes_round_trip():
    data = npz_bytes(np.ones((2, 4)), np.array([[0, 0, 4, 4], [1, 1, 2, 2]]), 4, 4, np.full((2, 3), 1 / 3))
    out = decode_regions(data, max_regions=5, feature_dim=4, num_classes=3)
    assert out["region_features"].dtype == torch.float32 and out["region_boxes"][1, 4] == 1.0
