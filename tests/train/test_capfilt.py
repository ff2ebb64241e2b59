"""CapFilt end to end on tiny shards: outputs, provenance, report, corrupt samples, resume after a
crash with identical output shards, input never overwritten, bad settings refused."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.tokenizer import Tokenizer, train_word_tokenizer
from vlmcore.train.tools import capfilt

from vlmcore.blip import build_blip, save_blip

WORDS = "a picture of red blue green circle square triangle small big".split()


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    text_file = root / "words.txt"
    text_file.write_text(" ".join(WORDS) + "\n")
    tok_path = train_word_tokenizer(str(text_file), str(root / "tok.json"))
    text = BlipText(Tokenizer(tok_path, 12))
    torch.manual_seed(0)
    spec = {"vision": {"kind": "vit", "image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            "text": text.med_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=32, encoder_width=32).__dict__,
            "embed_dim": 16, "momentum": None, "queue_size": 0}
    model = build_blip(spec).eval()
    with torch.no_grad():  # calibrate the random filter to keep about half: ITM margins centred at 0
        model.itm_head.weight.mul_(50)
        ids, mask = text.encode([f"a {c} {s}" for c in WORDS[3:6] for s in WORDS[6:9]])
        images = torch.randn(ids.shape[0], 3, 16, 16)
        logits = model.itm_logits(model.encode_image(images), ids, mask)
        model.itm_head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    ckpt = save_blip(model, str(root / "ckpt"))
    shards_dir = root / "in"
    shards_dir.mkdir()
    colours = ["red", "blue", "green", "white", "black", "yellow", "purple"]
    for s in range(3):
        samples = []
        for i, colour in enumerate(colours[: 3 + s]):
            key = f"{s:03d}{i:04d}"
            source = {"url": f"http://x/{key}", **({"image_id": 100 + i} if s == 1 else {})}
            samples += [(f"{key}.png", _png(colour)), (f"{key}.txt", f"a {colour} circle".encode()),
                        (f"{key}.json", json.dumps(source).encode())]
        samples += [(f"{s:03d}9998.png", b"not a png"), (f"{s:03d}9998.txt", b"broken image")]  # corrupt
        samples += [(f"{s:03d}9999.png", _png("red"))]  # no caption
        _write_shard(shards_dir / f"shard-{s:05d}.tar", samples)
    return root, tok_path, ckpt, sorted(str(p) for p in shards_dir.iterdir())


def _argv(root, tok, ckpt, out, *extra):
    return ["--input", str(root / "in" / "shard-{00000..00002}.tar"), "--output", str(out), "--captioner", ckpt,
            "--filter", ckpt, "--tokenizer", tok, "--num-captions", "2", "--max-length", "8", "--min-length", "3",
            "--batch-size", "2", "--context-length", "12", "--no-progress", *extra]


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def test_end_to_end_outputs_and_report(setup, tmp_path):
    root, tok, ckpt, shards = setup
    before = {p: open(p, "rb").read() for p in shards}
    report = capfilt.main(_argv(root, tok, ckpt, tmp_path / "out"))
    assert {p: open(p, "rb").read() for p in shards} == before  # input untouched
    total = report["total"]
    assert total["images"] == 3 + 4 + 5
    assert total["corrupt_skipped"] == 2 * 3
    assert total["web_kept"] + total["web_dropped"] == 12
    assert total["synthetic_kept"] + total["synthetic_dropped"] == 24
    assert 0 < total["web_kept"] + total["synthetic_kept"] < 36  # the filter keeps some, drops some
    on_disk = json.loads((tmp_path / "out" / capfilt.REPORT_NAME).read_text())
    assert on_disk == report
    written = 0
    for shard in shards:
        members = _members(tmp_path / "out" / os.path.basename(shard))
        by_key = {}
        for name, data in members:
            key, ext = name.split(".", 1)
            by_key.setdefault(key, {})[ext] = data
        for key, fields in by_key.items():
            assert set(fields) == {"png", "txt", "json"}
            meta = json.loads(fields["json"])
            kept = [c["text"] for c in meta["captions"] if c["kept"]]
            assert fields["txt"].decode().split("\n") == kept
            assert all(c["kept"] == (c["itm_score"] >= 0.5) or not c["text"] for c in meta["captions"])
            assert [c["source"] for c in meta["captions"]] == ["web", "synthetic", "synthetic"]
            assert meta["source_json"]["url"] == f"http://x/{key}"
            # the BLIP tasks read image_id at the top level: CapFilt carries it over when the input has one
            assert meta.get("image_id") == meta["source_json"].get("image_id")
            assert ("image_id" in meta) == key.startswith("001")
            assert len(meta["capfilt"]["filter"]["sha256"]) == 64
            assert not any(c["text"].startswith("a picture of") for c in meta["captions"][1:])
            written += 1
    assert written == total["images"] - total["images_without_caption"]


def test_crash_and_resume_gives_identical_shards(setup, tmp_path, monkeypatch):
    root, tok, ckpt, shards = setup
    clean = tmp_path / "clean"
    capfilt.main(_argv(root, tok, ckpt, clean))

    resumed = tmp_path / "resumed"
    real_flush = capfilt.CapFilt._flush
    calls = {"n": 0}

    def crashing_flush(self, batch, tar, stats):
        calls["n"] += 1
        if calls["n"] == 4:  # inside the second shard, after part of it was written to the .tmp file
            raise KeyboardInterrupt("killed")
        return real_flush(self, batch, tar, stats)

    monkeypatch.setattr(capfilt.CapFilt, "_flush", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        capfilt.main(_argv(root, tok, ckpt, resumed))
    assert os.path.exists(resumed / "shard-00000.tar")
    assert not os.path.exists(resumed / "shard-00001.tar")
    assert os.path.exists(resumed / "shard-00001.tar.tmp")  # the partial write of the killed run
    first_mtime = os.stat(resumed / "shard-00000.tar").st_mtime_ns

    processed = []
    real_process = capfilt.CapFilt.process_shard
    monkeypatch.setattr(capfilt.CapFilt, "_flush", real_flush)
    monkeypatch.setattr(capfilt.CapFilt, "process_shard",
                        lambda self, shard, out, progress=None: processed.append(os.path.basename(shard))
                        or real_process(self, shard, out, progress))
    report = capfilt.main(_argv(root, tok, ckpt, resumed))
    assert processed == ["shard-00001.tar", "shard-00002.tar"]  # the finished shard is not redone
    assert os.stat(resumed / "shard-00000.tar").st_mtime_ns == first_mtime
    for shard in shards:
        name = os.path.basename(shard)
        assert (resumed / name).read_bytes() == (clean / name).read_bytes(), name
    assert report == json.loads((clean / capfilt.REPORT_NAME).read_text())


def test_ranks_split_the_shards(setup, tmp_path, monkeypatch):
    root, tok, ckpt, shards = setup
    waited = []
    monkeypatch.setattr(capfilt, "_dist_info", lambda: (1, 2))
    monkeypatch.setattr(capfilt, "_barrier", waited.append)
    assert capfilt.main(_argv(root, tok, ckpt, tmp_path / "out")) is None  # rank 1 writes no report
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".tar") == ["shard-00001.tar"]
    assert len(waited) == 1


def test_bad_settings_are_refused(setup, tmp_path):
    root, tok, ckpt, _ = setup
    with pytest.raises(ValueError, match="output"):
        capfilt.main(_argv(root, tok, ckpt, root / "in"))
    with pytest.raises(ValueError, match="threshold"):
        capfilt.main(_argv(root, tok, ckpt, tmp_path / "o", "--threshold", "1.5"))
    with pytest.raises(ValueError, match="num_captions"):
        capfilt.main(_argv(root, tok, ckpt, tmp_path / "o", "--num-captions", "0"))
    with pytest.raises(ValueError, match="shards"):
        capfilt.main(["--input", str(tmp_path / "missing.tar"), "--output", str(tmp_path / "o"), "--captioner",
                      ckpt, "--filter", ckpt, "--tokenizer", tok])
