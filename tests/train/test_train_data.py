"""Data pipeline: shapes generator, WebDataset reading, splits, bad samples, exact resume, tokenizer."""

import io
import json
import tarfile

import pytest
import torch
from vlmcore.train.data.pipeline import (
    DataStream,
    ShardStream,
    batch_tokens,
    expand_shards,
    raw_stream,
    read_tar,
)
from vlmcore.train.data.tokenizer import EOC, MEDIA, Tokenizer
from vlmcore.train.tasks.clip import ClipEncoder
from vlmcore.train.tasks.common import ImageDecoder
from vlmcore.train.tasks.flamingo import FlamingoEncoder
from vlmcore.train.tools import shape_drawing, shapes


@pytest.fixture(scope="module")
def shapes_dir(shapes_dataset):
    # Not the shared set: the checks count its shards of 24 samples and the positions inside them.
    return shapes_dataset(n_train=96, n_eval=48, n_docs=24, image_size=32, shard_size=24, seed=1)


@pytest.fixture(scope="module")
def tok(shapes_dir):
    return Tokenizer(str(shapes_dir / "tokenizer.json"), context_length=24)


def _members(path):
    with tarfile.open(path) as tar:
        return [m.name for m in tar]


def test_shapes_dataset_layout(shapes_dir):
    assert shapes.is_complete(str(shapes_dir))
    assert len(shape_drawing.CLASSNAMES) >= 20
    assert len(expand_shards(str(shapes_dir / "train-{000000..000003}.tar"))) == 4
    classes = json.loads((shapes_dir / "classes.json").read_text())
    assert classes["classnames"] == shape_drawing.CLASSNAMES and classes["templates"]
    samples = list(read_tar(str(shapes_dir / "eval-000000.tar")))
    assert len(samples) == 24 and {"png", "txt", "json"} <= set(samples[0])
    meta = json.loads(samples[0]["json"])
    assert samples[0]["txt"].decode() == f"a {meta['colour']} {meta['shape']}"
    assert shape_drawing.CLASSNAMES[meta["label"]] == f"{meta['colour']} {meta['shape']}"
    doc = next(read_tar(str(shapes_dir / "docs-000000.tar")))
    info = json.loads(doc["json"])
    assert len(info["image_info"]) >= 1 and all(i["image_name"] in doc for i in info["image_info"])


def test_held_out_split_differs_in_size_and_background():
    import random

    train = [shape_drawing.split_params(random.Random(i), "train") for i in range(200)]
    held = [shape_drawing.split_params(random.Random(i), "eval") for i in range(200)]
    train_sizes, held_sizes = {round(p["half"], 3) for p in train}, {p["half"] for p in held}
    assert all(not (0.235 < h < 0.275) for h in train_sizes) and all(0.235 < h < 0.275 for h in held_sizes)
    assert not {p["bg"] for p in train} & {p["bg"] for p in held}


def test_tokenizer_special_tokens_and_padding(tok):
    ids = tok(["a red circle"])[0]
    assert ids.shape == (24,) and int(ids[3]) == tok.eos_token_id and int(ids[4]) == tok.pad_token_id
    assert tok.encode(f"{MEDIA} a red circle {EOC}")[0] == tok.media_token_id
    assert tok.encode(f"{MEDIA} a red circle {EOC}")[-1] == tok.eoc_token_id
    assert tok.decode(tok.encode("a blue square")) == "a blue square"
    long = tok(["red " * 50])[0]
    assert int(long[-1]) == tok.eos_token_id


def test_interleaved_document_encoding(shapes_dir):
    tok = Tokenizer(str(shapes_dir / "tokenizer.json"), context_length=64)
    enc = FlamingoEncoder("interleaved", tok, ImageDecoder.squash(16), max_images=3)
    doc = next(read_tar(str(shapes_dir / "docs-000000.tar")))
    n_images = len(json.loads(doc["json"])["image_info"])
    out = enc(doc)
    assert out["vision_x"].shape == (3, 1, 3, 16, 16)
    assert int((out["input_ids"] == tok.media_token_id).sum()) == n_images
    assert bool((out["vision_x"][n_images:] == 0).all()) and not bool((out["vision_x"][:n_images] == 0).all())
    assert bool((out["labels"][out["input_ids"] == tok.media_token_id] == -100).all())
    assert bool((out["labels"][out["attention_mask"] == 0] == -100).all())


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_and_counted(shapes_dir, tok, tmp_path):
    good = [s for s in read_tar(str(shapes_dir / "train-000000.tar"))][:6]
    png = good[0]["png"]
    samples = [(s["__key__"], {"png": s["png"], "txt": s["txt"]}) for s in good[:3]]
    samples += [
        ("bad_image", {"png": png[:40], "txt": b"a red circle"}),  # truncated PNG
        ("no_caption", {"png": png}),  # missing key
        ("bad_text", {"png": png, "txt": b"\xff\xfe\xfa"}),  # not UTF-8
        ("not_an_image", {"jpg": b"hello", "txt": b"a red circle"}),
    ]
    samples += [(s["__key__"], {"png": s["png"], "txt": s["txt"]}) for s in good[3:]]
    path = tmp_path / "mixed.tar"
    _write_tar(path, samples)
    ds = ShardStream([str(path)], ClipEncoder(tok, ImageDecoder.squash(16)), batch_size=6, seed=0, rank=0, world_size=1,
                     num_workers=0, shuffle_buffer=0, resampled=False)
    stream = DataStream("mixed", ds, num_workers=0)
    batch = next(stream)
    assert batch["images"].shape == (6, 3, 16, 16) and batch["tokens"].shape == (6, 24)
    assert stream.skipped == 4 and stream.state_dict()["workers"][0]["draws"] == 10
    assert stream.skip_counts == {"missing_caption": 1, "not_utf8": 1, "undecodable_image": 2}
    assert stream.state_dict()["workers"][0]["raw"] == [0, 0, 10]  # epoch 0, shard 0, next sample 10
    # A broken shard is counted too, and never stops the stream.
    (tmp_path / "broken.tar").write_bytes(path.read_bytes()[:3000])
    ds = ShardStream([str(tmp_path / "broken.tar"), str(path)], ClipEncoder(tok, ImageDecoder.squash(16)), batch_size=6,
                     seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=0, resampled=False)
    stream = DataStream("broken", ds, num_workers=0)
    next(stream)
    assert stream.skipped >= 1


@pytest.mark.parametrize("resampled", [False, True])
def test_split_by_rank_and_worker(shapes_dir, resampled):
    shards = expand_shards(str(shapes_dir / "train-*.tar"))
    keys = [[s["__key__"] for s, _ in zip(raw_stream(shards, 3, r, 4, resampled), range(24))] for r in range(4)]
    if not resampled:  # one epoch: 4 shards over 4 readers = a partition of the data
        assert sorted(k for ks in keys for k in ks) == sorted(s["__key__"] for p in shards for s in read_tar(p))
    else:  # independent draws per reader, reproducible
        again = [s["__key__"] for s, _ in zip(raw_stream(shards, 3, 0, 4, True), range(24))]
        assert again == keys[0]
    # Fewer shards than readers: samples are split instead.
    one = expand_shards(str(shapes_dir / "train-000000.tar"))
    parts = [[s["__key__"] for s, _ in zip(raw_stream(one, 3, r, 3, False), range(8))] for r in range(3)]
    assert sorted(k for p in parts for k in p) == sorted(s["__key__"] for s in read_tar(one[0]))


def test_exact_resume_of_the_data_position(shapes_dir, tok):
    def make(num_workers, start=None):
        ds = ShardStream(expand_shards(str(shapes_dir / "train-*.tar")), ClipEncoder(tok, ImageDecoder.squash(16)),
                         batch_size=5, seed=7, rank=1, world_size=2, num_workers=num_workers, shuffle_buffer=16,
                         resampled=False, start=start)
        return DataStream("train", ds, num_workers)

    for workers in (0, 2):
        full = make(workers)
        reference = [next(full)["tokens"] for _ in range(7)]
        first = make(workers)
        for _ in range(3):
            next(first)
        state = first.state_dict()
        resumed = make(workers, start=state)
        resumed.load_state_dict(state)
        for expected in reference[3:]:
            assert torch.equal(next(resumed)["tokens"], expected)


def test_starting_a_stream_leaves_the_global_rng_alone(shapes_dir, tok):
    ds = ShardStream(expand_shards(str(shapes_dir / "train-*.tar")), ClipEncoder(tok, ImageDecoder.squash(16)),
                     batch_size=4, seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=8, resampled=True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(DataStream("train", ds, num_workers=0))
    assert torch.equal(torch.rand(3), expected)


def test_hf_tokenizer_directory_gets_the_special_tokens(shapes_dir, tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast
    from vlmcore.train.data.tokenizer import SPECIAL_TOKENS

    raw = RawTokenizer.from_file(str(shapes_dir / "tokenizer.json"))
    # A plain HF tokenizer directory without the Flamingo tokens: they are added on load.
    plain = [t for t in raw.get_vocab() if t not in SPECIAL_TOKENS]
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    hf.save_pretrained(tmp_path / "hf")
    tok = Tokenizer(str(tmp_path / "hf"), context_length=12)
    assert tok.media_token_id is not None and tok.eoc_token_id is not None and tok.pad_token_id is not None
    ids = tok.encode(f"{MEDIA} a red circle {EOC}")
    assert ids[0] == tok.media_token_id and ids[-1] == tok.eoc_token_id and len(ids) == 5
    assert tok([plain[0]]).shape == (1, 12) and tok.vocab_size >= len(plain)


def test_batch_tokens_counts_text_tokens_whatever_the_pad_id():
    # Word tokenizer layout (pad 0, eos 1): text + eos + padding.
    tokens = torch.tensor([[7, 8, 1, 0, 0], [9, 1, 0, 0, 0]])
    assert batch_tokens({"tokens": tokens}, pad_token_id=0, eos_token_id=1) == 5
    # OpenAI CLIP tokenizer layout: pad == eos (49407), and id 0 is a real token.
    tokens = torch.tensor([[0, 320, 49407, 49407, 49407], [320, 0, 1929, 49407, 49407]])
    assert batch_tokens({"tokens": tokens}, pad_token_id=49407, eos_token_id=49407) == 7
    assert batch_tokens({"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}) == 3
