"""Training streams: fail fast on data with no usable sample (with the reasons), MMC4 layouts
(ours and OpenFlamingo's ``image_base64``), similarity threshold, resume by position."""

import base64
import io
import json
import tarfile
import time

import pytest
import torch
from PIL import Image
from vlmcore.train.data import pipeline as data_module
from vlmcore.train.data.pipeline import (
    DataStream,
    NoUsableSamplesError,
    ShardStream,
    doc_fields,
    drop_dissimilar_images,
    expand_shards,
    read_tar,
)
from vlmcore.train.data.tokenizer import EOC, MEDIA, Tokenizer
from vlmcore.train.tasks.clip import ClipEncoder
from vlmcore.train.tasks.common import ImageDecoder
from vlmcore.train.tasks.flamingo import FlamingoEncoder


@pytest.fixture(scope="module")
def shapes_dir(shapes_dataset):
    # Not the shared set: the resume checks count decodes and positions in its 4 training shards of 16.
    return shapes_dataset(n_train=64, n_eval=16, n_docs=24, image_size=32, shard_size=16, seed=5)


@pytest.fixture(scope="module")
def tok(shapes_dir):
    return Tokenizer(str(shapes_dir / "tokenizer.json"), context_length=48)


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _stream(shards, encoder, name="data", workers=0, resampled=True, start=None, batch_size=4, buffer=8, **kw):
    ds = ShardStream(shards, encoder, batch_size, seed=3, rank=0, world_size=1, num_workers=workers,
                     shuffle_buffer=buffer, resampled=resampled, start=start, name=name, **kw)
    return DataStream(name, ds, workers)


def _caption_under_another_key(shapes_dir, tmp_path):
    pairs = [s for s in read_tar(str(shapes_dir / "train-000000.tar"))][:6]
    return _write_tar(tmp_path / "other-key.tar", [
        (s["__key__"], {"png": s["png"], "json": json.dumps({"text": s["txt"].decode()}).encode()}) for s in pairs])


@pytest.mark.parametrize("workers,resampled", [(0, True), (2, False)])
def test_a_shard_without_usable_samples_fails_fast_with_the_reasons(shapes_dir, tok, tmp_path, workers, resampled):
    shard = _caption_under_another_key(shapes_dir, tmp_path)
    stream = _stream([shard, shard], ClipEncoder(tok, ImageDecoder.squash(16)), name="laion", workers=workers,
                     resampled=resampled)
    started = time.perf_counter()
    with pytest.raises(NoUsableSamplesError) as err:
        next(stream)
    assert time.perf_counter() - started < 30  # the default 5000 attempts, then the error (it used to hang)
    message = str(err.value)
    assert message.startswith("dataset 'laion': 0 of 5000 samples usable in a row") and shard in message
    assert "5000 missing_caption" in message and "has keys ['text'] but no 'caption'" in message
    assert "another layout" in message and "data.max_consecutive_bad_samples" in message


def test_kind_mismatch_and_empty_shards_are_named(shapes_dir, tok, tmp_path):
    docs, pairs = str(shapes_dir / "docs-000000.tar"), str(shapes_dir / "train-000000.tar")
    with pytest.raises(NoUsableSamplesError, match=r"50 kind_mismatch \(first: .*set kind: interleaved"):
        next(_stream([docs], ClipEncoder(tok, ImageDecoder.squash(16)), max_consecutive_bad=50))
    with pytest.raises(NoUsableSamplesError, match=r"50 kind_mismatch \(first: .*set kind: pairs"):
        documents = FlamingoEncoder("interleaved", tok, ImageDecoder.squash(16), max_images=2)
        next(_stream([pairs], documents, max_consecutive_bad=50))
    empty = _write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(NoUsableSamplesError, match=r"20 no_samples \(first: shard .*empty.tar has no sample"):
        next(_stream([empty], ClipEncoder(tok, ImageDecoder.squash(16)), max_consecutive_bad=20))
    # Good samples in between reset the count: a noisy but usable shard never trips it.
    good = [s for s in read_tar(pairs)][:4]
    noisy = _write_tar(tmp_path / "noisy.tar", [(f"bad{i}", {"png": good[0]["png"]}) for i in range(3)]
                       + [(s["__key__"], {"png": s["png"], "txt": s["txt"]}) for s in good])
    stream = _stream([noisy], ClipEncoder(tok, ImageDecoder.squash(16)), max_consecutive_bad=4, buffer=0)
    for _ in range(3):
        next(stream)
    assert stream.skip_counts == {"missing_caption": 9}


def _png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_mmc4_openflamingo_layout_matches_ours_and_similarity_drops_images(tok, tmp_path):
    texts = ["a red square", "then a blue circle", "no image here", "a green star"]
    images = [_png("red"), _png("blue"), _png("green")]
    infos = [{"matched_text_index": 0, "matched_sim": 0.31}, {"matched_text_index": 1, "matched_sim": 0.18},
             {"matched_text_index": 3, "matched_sim": 0.27}]
    ours = {"__key__": "d0", "json": json.dumps({"text_list": texts, "image_info": [
        {**info, "image_name": f"img{i}.png"} for i, info in enumerate(infos)]}).encode(),
        **{f"img{i}.png": im for i, im in enumerate(images)}}
    openflamingo = {"__key__": "d0", "json": json.dumps({"text_list": texts, "image_info": [
        {**info, "image_base64": base64.b64encode(im).decode()} for info, im in zip(infos, images)]}).encode()}
    enc = FlamingoEncoder("interleaved", tok, ImageDecoder.squash(16), max_images=3)
    a, b = enc(ours), enc(openflamingo)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert int((a["input_ids"] == tok.media_token_id).sum()) == 3

    kept = drop_dissimilar_images(openflamingo, 0.24)  # OpenFlamingo's threshold
    blobs, text = doc_fields(kept, max_images=3)
    assert blobs == [images[0], images[2]]
    assert text == f"{MEDIA} a red square then a blue circle no image here {EOC} {MEDIA} a green star {EOC}"
    assert drop_dissimilar_images(openflamingo, 0.0) is openflamingo  # 0 = keep all
    # Without matched_sim, the similarity matrix (images x sentences) is read, as OpenFlamingo does.
    matrix = {"text_list": texts, "similarity_matrix": [[0.3, 0, 0, 0], [0, 0.1, 0, 0], [0, 0, 0, 0.3]],
              "image_info": [{"matched_text_index": i["matched_text_index"], "image_base64":
                              base64.b64encode(im).decode()} for i, im in zip(infos, images)]}
    kept = drop_dissimilar_images({"__key__": "d1", "json": json.dumps(matrix).encode()}, 0.24)
    assert doc_fields(kept, 3)[0] == [images[0], images[2]]
    with pytest.raises(data_module.BadSample) as err:
        drop_dissimilar_images({"__key__": "d3", "json": json.dumps({"text_list": texts, "image_info": [
            {"matched_text_index": 0, "image_name": "img0.png"}]}).encode()}, 0.24)
    assert err.value.reason == "missing_similarity"
    # The stream applies data.train[i].min_image_similarity: a threshold above every image ends it, named.
    shard = _write_tar(tmp_path / "mmc4.tar", [(f"d{i}", {"json": openflamingo["json"]}) for i in range(3)])
    with pytest.raises(NoUsableSamplesError, match=r"30 no_image \(first: document d\d has no image with "
                                                   r"matched_sim >= 0.4\)"):
        next(_stream([shard], enc, max_consecutive_bad=30, min_image_similarity=0.4))
    batch = next(_stream([shard], enc, batch_size=2, min_image_similarity=0.24))
    assert batch["vision_x"].shape == (2, 3, 1, 3, 16, 16)
    # Broken inline images and missing members are counted under their own reasons.
    broken = {"__key__": "d2", "json": json.dumps({"text_list": texts, "image_info": [
        {"matched_text_index": 0, "image_base64": "not base64!"}]}).encode()}
    with pytest.raises(data_module.BadSample) as err:
        enc(broken)
    assert err.value.reason == "undecodable_image"
    del ours["img1.png"]
    with pytest.raises(data_module.BadSample, match="missing image member 'd0.img1.png'") as err:
        enc(ours)
    assert err.value.reason == "missing_member"


@pytest.mark.parametrize("buffer", [0, 8])
def test_resume_by_position_opens_no_earlier_shard_and_decodes_nothing_twice(shapes_dir, tok, monkeypatch, buffer):
    shards = expand_shards(str(shapes_dir / "train-*.tar"))  # 4 shards of 16
    encoder = ClipEncoder(tok, ImageDecoder.squash(16))
    decodes, opened = [0], []
    real_open, real_open_shard = Image.open, data_module.open_shard

    def counting_open(*args, **kwargs):
        decodes[0] += 1
        return real_open(*args, **kwargs)

    def recording_open_shard(path):
        opened.append(path)
        return real_open_shard(path)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(data_module, "open_shard", recording_open_shard)

    full = _stream(shards, encoder, resampled=False, batch_size=5, buffer=buffer)
    reference = [next(full)["tokens"] for _ in range(9)]  # 45 of the 64 samples
    decodes[0] = 0
    first = _stream(shards, encoder, resampled=False, batch_size=5, buffer=buffer)
    for _ in range(5):
        next(first)
    assert decodes[0] == 25  # exactly the samples of 5 batches: nothing decoded ahead
    state = first.state_dict()
    epoch, current, offset = state["workers"][0]["raw"]
    assert (epoch, current) == (0, 1 if buffer == 0 else 2) and offset > 0  # inside a later shard
    order = data_module.reader_shards(shards, 3, 0, 1, False, 0)[0]
    buffered = {order[ref[1]] for ref in state["workers"][0]["buffer"]}
    assert len(state["workers"][0]["buffer"]) == (0 if buffer == 0 else 8)

    decodes[0], opened[:] = 0, []
    resumed = _stream(shards, encoder, resampled=False, batch_size=5, buffer=buffer, start=state)
    resumed.load_state_dict(state)
    for expected in reference[5:]:
        assert torch.equal(next(resumed)["tokens"], expected)
    assert decodes[0] == 20  # the 4 batches after the resume point, not one sample more
    # Opened again: only the shards holding buffered samples (to re-read those, not decoded) and the current one.
    assert set(opened[:len(buffered) + 1]) == buffered | {order[current]}
    assert order[0] not in opened or order[0] in buffered
