"""The ``video`` data kind: frame sampling, the three layouts (video member, frames, .npy), spans,
bad clips as counted skips, the task-side VideoDecoder and the Flamingo encoder / config checks."""

import builtins
import io
import json
import random

import numpy as np
import pytest
import torch
import yaml
from helpers.training import CONFIGS
from vlmcore.train.config import ConfigError, parse_config
from vlmcore.train.data.pipeline import SKIP_REASONS, BadSample, sample_rng
from vlmcore.train.data.preprocess import ImageTransform
from vlmcore.train.data.video import MAX_VIDEO_FRAMES, frame_positions, video_fields
from vlmcore.train.tasks.common import ImageDecoder, VideoDecoder
from vlmcore.train.tools.shape_drawing import moving_shape
from vlmcore.train.tools.video_shapes import FPS, clip_members, encode_video

pytest.importorskip("av")

SIDE = 32


def _frames(n=8, direction="right"):
    return moving_shape(random.Random(0), "circle", "red", direction, "train", SIDE, n)


def _sample(members, caption="a red circle moving right", meta=None, key="clip0"):
    sample = {"__key__": key, "__url__": "mem.tar", **members, "txt": caption.encode()}
    if meta is not None:
        sample["json"] = json.dumps(meta).encode()
    return sample


def _colour_frames(n):
    """n frames of one flat grey level each (frame i = level 20 * i): a decoded frame tells its index."""
    from PIL import Image

    return [Image.new("RGB", (SIDE, SIDE), (20 * i,) * 3) for i in range(n)]


def _indices(frames):
    return [round(float(np.asarray(f, np.float32).mean()) / 20) for f in frames]


# ----------------------------------------------------------------------------------------- sampling


def test_eval_positions_are_segment_centres():
    assert frame_positions(8, 4) == [1, 3, 5, 7]
    assert frame_positions(12, 3) == [2, 6, 10]
    assert frame_positions(10, 4) == [1, 3, 6, 8]  # centres of [0, 2.5), [2.5, 5), [5, 7.5), [7.5, 10)


def test_train_positions_jitter_inside_their_segments():
    seen = [set() for _ in range(4)]
    for seed in range(200):
        positions = frame_positions(20, 4, random.Random(seed))
        for i, p in enumerate(positions):
            assert 5 * i <= p < 5 * (i + 1)
            seen[i].add(p)
    assert all(len(s) == 5 for s in seen)  # every frame of every segment gets drawn
    assert frame_positions(20, 4, random.Random(3)) == frame_positions(20, 4, random.Random(3))


def test_short_clips_keep_every_frame():
    assert frame_positions(3, 8) == [0, 1, 2]
    assert frame_positions(3, 8, random.Random(0)) == [0, 1, 2]
    assert frame_positions(1, 1) == [0]
    with pytest.raises(ValueError, match="count and num_frames"):
        frame_positions(0, 4)


# ----------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("container,codec,ext", [("mp4", "mpeg4", "mp4"), ("mp4", "libx264", "mp4"),
                                                  ("webm", "libvpx", "webm"), ("matroska", "mpeg4", "mkv")])
def test_video_members_decode_the_chosen_frames(container, codec, ext):
    data = encode_video(_colour_frames(12), codec=codec, container=container)
    frames, caption = video_fields(_sample({ext: data}), 4)
    assert caption == "a red circle moving right"
    assert _indices(frames) == [1, 4, 7, 10]  # centres of 4 segments of 12 frames (int of 1.5, 4.5, ...)
    jittered, _ = video_fields(_sample({ext: data}), 4, random.Random(5))
    assert [3 * i <= j < 3 * (i + 1) for i, j in enumerate(_indices(jittered))] == [True] * 4


@pytest.mark.parametrize("layout", ["frames", "npy"])
def test_frames_layouts_decode_like_the_video(layout):
    frames = _frames()
    video, _ = video_fields(_sample(clip_members(frames, "mp4")), 4)
    stored, _ = video_fields(_sample(clip_members(frames, layout)), 4)
    assert len(stored) == len(video) == 4
    for a, b in zip(stored, video):  # the same frames; the mp4 ones carry the codec's small error
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() < 6


def test_frame_members_are_ordered_by_number():
    members = {f"frame{i}.png": m for i, m in enumerate(clip_members(_colour_frames(11), "frames").values())}
    frames, _ = video_fields(_sample(members), 11)
    assert _indices(frames) == list(range(11))  # frame10 after frame9, not after frame1


def test_span_decodes_only_its_seconds():
    data = encode_video(_colour_frames(16))  # 16 frames at 8 fps: frame i at i / 8 s
    frames, _ = video_fields(_sample({"mp4": data}, meta={"start": 0.5, "end": 1.5}), 4)
    assert _indices(frames) == [5, 7, 9, 11]  # frames 4..11, centres of 4 segments of 2
    npy = clip_members(_colour_frames(16), "npy")
    frames, _ = video_fields(_sample(npy, meta={"start": 0.5, "end": 1.5, "fps": FPS}), 4)
    assert _indices(frames) == [5, 7, 9, 11]
    with pytest.raises(BadSample, match="no positive 'fps'") as err:
        video_fields(_sample(npy, meta={"start": 0.5}), 4)
    assert err.value.reason == "json_error"
    with pytest.raises(BadSample, match="0 <= start < end") as err:
        video_fields(_sample({"mp4": data}, meta={"start": 2, "end": 1}), 4)
    with pytest.raises(BadSample, match="no frame in") as err:
        video_fields(_sample({"mp4": data}, meta={"start": 5, "end": 6}), 4)
    assert err.value.reason == "bad_video"


def test_bad_clips_are_counted_skips():
    assert "bad_video" in SKIP_REASONS
    data = encode_video(_frames())
    broken = {"truncated": {"mp4": data[: len(data) // 3]}, "garbage": {"mp4": b"\x00not a video" * 20},
              "empty": {"webm": b""}, "nothing": {"bin": b"x"}, "bad npy": {"npy": b"\x93NUMPY junk"},
              "wrong array": clip_members(_frames(), "npy") | {"npy": _npy(np.zeros((2, 4, 4), np.uint8))}}
    for name, members in broken.items():
        with pytest.raises(BadSample) as err:
            video_fields(_sample(members), 4)
        assert err.value.reason == "bad_video", (name, err.value)
    with pytest.raises(BadSample) as err:
        video_fields(_sample({"png": b"x"}), 4)
    assert err.value.reason == "kind_mismatch"
    with pytest.raises(BadSample) as err:
        video_fields(_sample({"mp4": data}, caption=""), 4)
    assert err.value.reason == "empty_caption"


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_decode_is_bounded(monkeypatch):
    import vlmcore.train.data.video as video

    assert MAX_VIDEO_FRAMES >= 10 * 60 * 25  # ten minutes of 25 fps video fit
    monkeypatch.setattr(video, "MAX_VIDEO_FRAMES", 5)
    with pytest.raises(BadSample, match="more than 5 frames") as err:
        video_fields(_sample({"mp4": encode_video(_frames())}), 4)
    assert err.value.reason == "bad_video"
    with pytest.raises(BadSample, match="data.max_image_pixels") as err:
        video_fields(_sample({"mp4": encode_video(_frames())}), 4, max_pixels=SIDE * SIDE - 1)
    assert err.value.reason == "image_too_large"


def test_missing_pyav_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ImportError, match=r"pip install vlmcore\[video\]"):
        video_fields(_sample({"mp4": b"..."}), 4)


# ----------------------------------------------------------------------------------------- decoder


def _decoder(num_frames, train):
    transform = ImageTransform(size=16, is_train=train, scale=(0.5, 0.6))
    return VideoDecoder(ImageDecoder(transform, seed=7), num_frames, train)


def test_video_decoder_pads_short_clips_and_masks_them():
    sample = _sample(clip_members(_frames(3), "npy"))
    frames, mask, caption = _decoder(5, train=False)(sample)
    assert frames.shape == (5, 3, 16, 16) and frames.dtype == torch.float32
    assert mask.tolist() == [True, True, True, False, False]
    assert torch.equal(frames[3:], torch.zeros(2, 3, 16, 16))
    assert frames[:3].abs().sum() > 0 and caption == "a red circle moving right"


def test_video_decoder_one_crop_per_clip_and_resumable():
    """Training: every frame gets the same random crop (a still clip stays still), drawn, like the
    frame jitter, from the sample's generator: the same sample decodes identically again."""
    still = _sample({"npy": _npy(np.stack([np.asarray(_frames(2)[0])] * 8))})  # one frame, 8 times
    frames, mask, _ = _decoder(4, train=True)(still)
    assert mask.all() and all(torch.equal(frames[0], f) for f in frames[1:])
    eval_frames, _, _ = _decoder(4, train=False)(still)
    assert not torch.equal(frames[0], eval_frames[0])  # the train crop is not the eval resize
    moving = _sample(clip_members(_frames(16), "npy"))
    again = [_decoder(4, train=True)(moving)[0] for _ in range(2)]
    assert torch.equal(again[0], again[1])
    assert sample_rng(7, moving).random() == sample_rng(7, moving).random()


# ----------------------------------------------------------------------------------------- config / encoder


def _flamingo_raw(**flamingo):
    with open(CONFIGS / "flamingo_tiny.yaml", encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["data"]["shapes"] = None
    raw["data"]["train"] = [{"name": "clips", "kind": "video", "shards": "x-*.tar", "num_frames": 4},
                            {"name": "pairs", "kind": "pairs", "shards": "y-*.tar"}]
    raw["model"]["flamingo"].update(flamingo)
    return raw


def test_video_needs_enough_time_embeddings():
    cfg = parse_config(_flamingo_raw(max_num_frames=4))
    assert cfg.data.train[0].num_frames == 4 and cfg.data.train[1].num_frames == 8  # the default, unused
    with pytest.raises(ConfigError, match=r"data.train.0.num_frames: .*model.flamingo.max_num_frames >= 4") as err:
        parse_config(_flamingo_raw(max_num_frames=2))
    assert "(it is 2" in str(err.value)
    with pytest.raises(ConfigError, match="max_num_frames >= 4"):
        parse_config(_flamingo_raw())  # 0 = images only


def test_tasks_without_video_reject_it():
    with open(CONFIGS / "clip_tiny.yaml", encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["data"]["shapes"] = None
    raw["data"]["train"] = [{"kind": "video", "shards": "x-*.tar"}]
    with pytest.raises(ConfigError, match="data.train: task 'clip' trains on image-text pairs only"):
        parse_config(raw)


def test_flamingo_encoder_writes_one_clip_of_f_frames(tmp_path):
    from vlmcore.train.data.tokenizer import Tokenizer, train_word_tokenizer
    from vlmcore.train.tasks import get_task

    (tmp_path / "words.txt").write_text("a red circle moving right left up down\n")
    train_word_tokenizer(str(tmp_path / "words.txt"), str(tmp_path / "tok.json"))
    raw = _flamingo_raw(max_num_frames=4)
    raw["tokenizer"] = {"path": str(tmp_path / "tok.json"), "context_length": 12, "train_from_shapes": False}
    cfg = parse_config(raw)
    task = get_task("flamingo")(cfg, Tokenizer(str(tmp_path / "tok.json"), 12))
    encode = task.encoder("video", 4)
    example = encode(_sample(clip_members(_frames(3), "npy")))
    size = cfg.model.vision.image_size
    assert example["vision_x"].shape == (1, 4, 3, size, size)
    assert example["frame_mask"].tolist() == [[True, True, True, False]]
    ids = example["input_ids"][example["attention_mask"].bool()].tolist()
    assert ids[0] == task.tok.media_token_id and task.tok.eoc_token_id in ids
    assert example["labels"][0] == -100  # the <image> token is never a target
    pair = task.encoder("pairs", 1)(_sample({"png": clip_members(_frames(2), "frames")["frame000.png"]}))
    assert pair["vision_x"].shape == (1, 1, 3, size, size) and "frame_mask" not in pair


@pytest.mark.parametrize("video_format", ["mp4", "frames", "npy"])
def test_make_shapes_video_cli(video_format, tmp_path, capsys):
    from vlmcore.train.data.pipeline import read_tar
    from vlmcore.train.tools.make_shapes import console_main

    console_main(["--out", str(tmp_path), "--video", "--video-format", video_format, "--n", "4", "--n-eval", "2",
                  "--num-frames", "5", "--image-size", "16"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["video_format"] == video_format and summary["num_frames"] == 5
    samples = list(read_tar(str(tmp_path / "video-train-000000.tar")))
    assert len(samples) == 4
    frames, caption = video_fields(samples[0], 5)
    assert len(frames) == 5 and frames[0].size == (16, 16)
    assert caption.split()[-2] == "moving" and caption.split()[-1] == json.loads(samples[0]["json"])["direction"]
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "video.json").is_file()
