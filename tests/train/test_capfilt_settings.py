"""CapFilt records what made each shard (settings, checkpoint hashes) and refuses to mix settings
in one output folder, or redoes the mismatched shards when asked."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.tokenizer import Tokenizer, train_word_tokenizer
from vlmcore.train.tools import capfilt

from vlmcore.blip import build_blip, save_blip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random BLIP checkpoint, its tokenizer, one input shard of two captioned images."""
    root = tmp_path_factory.mktemp("capfilt_settings")
    (root / "words.txt").write_text("a picture of red blue circle square\n")
    tok = train_word_tokenizer(str(root / "words.txt"), str(root / "tok.json"))
    text = BlipText(Tokenizer(tok, 12))
    torch.manual_seed(0)
    spec = {"vision": {"kind": "vit", "image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            "text": text.med_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=32, encoder_width=32).__dict__,
            "embed_dim": 16, "momentum": None, "queue_size": 0}
    ckpt = save_blip(build_blip(spec).eval(), str(root / "ckpt"))
    (root / "in").mkdir()
    with tarfile.open(root / "in" / "shard-00000.tar", "w") as tar:
        for key, colour in (("k0", "red"), ("k1", "blue")):
            image = io.BytesIO()
            Image.new("RGB", (20, 20), colour).save(image, format="PNG")
            for name, data in ((f"{key}.png", image.getvalue()), (f"{key}.txt", f"a {colour} circle".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root, tok, ckpt


def _argv(root, tok, ckpt, out, *extra):
    return ["--input", str(root / "in" / "shard-00000.tar"), "--output", str(out), "--captioner", ckpt,
            "--filter", ckpt, "--tokenizer", tok, "--max-length", "8", "--min-length", "3", "--context-length", "12",
            "--no-progress", *extra]


def test_a_rerun_with_other_settings_is_refused_or_redone(setup, tmp_path):
    root, tok, ckpt = setup
    out = tmp_path / "out"
    capfilt.main(_argv(root, tok, ckpt, out))
    stats = json.loads((out / ("shard-00000.tar" + capfilt.STATS_SUFFIX)).read_text())
    assert stats["settings"]["threshold"] == 0.5 and len(stats["settings"]["captioner"]["sha256"]) == 64

    with pytest.raises(ValueError, match=r"shard-00000.tar was made with other settings \(threshold: 0.5 then, "
                                         r"0.9 now\).*--redo-mismatched"):
        capfilt.main(_argv(root, tok, ckpt, out, "--threshold", "0.9"))
    report = capfilt.main(_argv(root, tok, ckpt, out, "--threshold", "0.9", "--redo-mismatched"))
    stats = json.loads((out / ("shard-00000.tar" + capfilt.STATS_SUFFIX)).read_text())
    assert stats["settings"]["threshold"] == 0.9 and report["total"]["images"] == 2  # redone, not summed



def _shard(path, members):
    """A tar of ``(name, bytes)`` members, the names written as given."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(side: int, mode: str = "RGB") -> bytes:
    image = io.BytesIO()
    Image.new(mode, (side, side)).save(image, format="PNG")
    return image.getvalue()


def test_unsafe_member_names_and_images_above_the_pixel_cap_are_corrupt_never_copied(setup, tmp_path):
    root, tok, ckpt = setup
    shard = tmp_path / "in" / "unsafe-00000.tar"
    shard.parent.mkdir()
    caption = b"a red circle"
    _shard(shard, [("k0.png", _png(20)), ("k0.txt", caption), ("../up.png", _png(20)), ("../up.txt", caption),
                   ("/abs.png", _png(20)), ("/abs.txt", caption), ("sub/../esc.png", _png(20)),
                   ("sub/../esc.txt", caption), ("huge.png", _png(13000, "1")), ("huge.txt", caption)])
    argv = _argv(root, tok, ckpt, tmp_path / "out", "--threshold", "0")  # keeps every caption
    argv[1] = str(shard)
    report = capfilt.main(argv)
    assert report["total"]["images"] == 1 and report["total"]["corrupt_skipped"] == 4
    examples = " | ".join(report["shards"]["unsafe-00000.tar"]["corrupt_examples"])
    assert "../up: a member name has a '..' component" in examples and "/abs: a member name starts with '/'" in examples
    assert "sub/../esc: a member name has a '..' component" in examples
    assert "huge: image is above the cap of 50000000 pixels" in examples
    with tarfile.open(tmp_path / "out" / "unsafe-00000.tar") as out:
        assert sorted(out.getnames()) == ["k0.json", "k0.png", "k0.txt"]

    argv = _argv(root, tok, ckpt, tmp_path / "capped", "--threshold", "0", "--max-image-pixels", "399")
    argv[1] = str(shard)
    report = capfilt.main(argv)  # 20 x 20 = 400 pixels: above this cap too
    assert report["total"]["images"] == 0 and report["total"]["corrupt_skipped"] == 5
    stats = json.loads((tmp_path / "capped" / ("unsafe-00000.tar" + capfilt.STATS_SUFFIX)).read_text())
    assert stats["settings"]["max_image_pixels"] == 399


def test_missing_inputs_are_a_usage_error_that_names_them(setup, tmp_path, capsys, monkeypatch):
    root, tok, ckpt = setup
    argv = _argv(root, tok, ckpt, tmp_path / "out")
    argv[1:2] = [str(root / "in" / "shard-00000.tar"), str(tmp_path / "gone.tar")]
    monkeypatch.setattr("sys.argv", ["vlmcore-capfilt", *argv])
    with pytest.raises(SystemExit) as exit_:
        capfilt.console_main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith("vlmcore-capfilt: error: --input: shards")
    assert f"1 of 2 file(s) missing: {tmp_path}/gone.tar" in err

    argv[1:3] = [str(tmp_path / "none-*.tar")]
    monkeypatch.setattr("sys.argv", ["vlmcore-capfilt", *argv])
    with pytest.raises(SystemExit) as exit_:
        capfilt.console_main()
    assert exit_.value.code == 2 and f"no file matches {tmp_path}/none-*.tar" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
