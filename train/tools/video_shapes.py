"""Moving shapes: the shapes dataset as video clips (``vlmcore-make-shapes --video``), for the
``video`` data kind (:mod:`vlmcore.train.data.video`).

A clip is one shape (the 24 classes of :mod:`vlmcore.train.tools.shape_drawing`) moving left, right,
up or down at constant speed over ``num_frames`` frames; its caption is ``"a <colour> <shape> moving
<direction>"``. The path's centre does not depend on the direction, so a single frame cannot tell
the direction: a model must read the frames in order. Held-out clips use the held-out backgrounds.

Output directory::

    video-train-000000.tar ...   KEY.mp4 (or the frames layout, see --video-format) + KEY.txt + KEY.json
    video-eval-000000.tar ...    held-out clips
    captions.txt, tokenizer.json every caption, and a word tokenizer trained on them
    video.json                   the generation parameters, written last (marks a complete set)

``video_format``: ``mp4`` (MPEG-4 Part 2 in an MP4 container, PyAV's encoder), ``frames``
(``KEY.frame000.png`` ...) or ``npy`` (``KEY.npy``, uint8 ``[F, H, W, 3]``).
"""

from __future__ import annotations

import io
import json
import os
import random
import time

import numpy as np
from PIL import Image
from vlmcore.train.data.tar_writer import ShardWriter
from vlmcore.train.data.tokenizer import train_word_tokenizer
from vlmcore.train.tools.shape_drawing import CLASSES, DIRECTIONS, moving_shape, png_bytes, write_summary

VIDEO_FORMATS = ("mp4", "frames", "npy")
FPS = 8


def encode_video(frames: list[Image.Image], fps: int = FPS, codec: str = "mpeg4", container: str = "mp4") -> bytes:
    """``frames`` (RGB, equal sizes, even sides) encoded into an in-memory video file with PyAV."""
    import av  # the `video` extra; only this writer and the video decoder need it

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000  # near-lossless for these tiny frames: the default rate blurs a few-pixel shape
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")))
        out.mux(stream.encode())  # flush the encoder
    return buf.getvalue()


def clip_members(frames: list[Image.Image], video_format: str) -> dict[str, bytes]:
    """The members holding ``frames`` in ``video_format`` (see the module docstring)."""
    if video_format == "mp4":
        return {"mp4": encode_video(frames)}
    if video_format == "frames":
        return {f"frame{i:03d}.png": png_bytes(f) for i, f in enumerate(frames)}
    if video_format == "npy":
        buf = io.BytesIO()
        np.save(buf, np.stack([np.asarray(f.convert("RGB")) for f in frames]))
        return {"npy": buf.getvalue()}
    raise ValueError(f"video_format must be one of {VIDEO_FORMATS}, got {video_format!r}")


def _write_clips(out_dir: str, rng: random.Random, split: str, n: int, sizes: tuple[int, int, int],
                 video_format: str) -> list[str]:
    """Write ``video-<split>-*.tar``; returns the captions. ``sizes`` = (image side, frames, shard size)."""
    side, num_frames, shard_size = sizes
    directions = sorted(DIRECTIONS)
    writer = ShardWriter(out_dir, f"video-{split}", shard_size)
    captions = []
    for i in range(n):
        # Held-out clips cycle through every (class, direction); training clips draw them.
        shape, colour = CLASSES[i % len(CLASSES)] if split == "eval" else rng.choice(CLASSES)
        direction = directions[(i // len(CLASSES)) % 4] if split == "eval" else rng.choice(directions)
        frames = moving_shape(rng, shape, colour, direction, split, side, num_frames)
        caption = f"a {colour} {shape} moving {direction}"
        captions.append(caption)
        meta = {"shape": shape, "colour": colour, "direction": direction, "fps": FPS}
        writer.write(f"{split}{i:07d}", {**clip_members(frames, video_format), "txt": caption.encode(),
                                          "json": json.dumps(meta).encode()})
    writer.close()
    return captions


def make_video_shapes(out_dir: str, n_train: int, n_eval: int = 96, num_frames: int = 8, image_size: int = 32,
                      shard_size: int = 1000, seed: int = 0, video_format: str = "mp4") -> dict:
    """Generate the moving-shapes clips into ``out_dir`` (see the module docstring); returns the summary."""
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(num_frames, int) or num_frames < 2:
        raise ValueError(f"num_frames must be an int >= 2 (a motion), got {num_frames!r}")
    if not isinstance(image_size, int) or image_size < 16 or image_size % 2:
        raise ValueError(f"image_size must be an even int >= 16 (video encoders need even sides), got {image_size!r}")
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format must be one of {VIDEO_FORMATS}, got {video_format!r}")
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    rng = random.Random(seed)
    sizes = (image_size, num_frames, shard_size)
    captions = _write_clips(out_dir, rng, "train", n_train, sizes, video_format)
    captions += _write_clips(out_dir, rng, "eval", n_eval, sizes, video_format)
    with open(os.path.join(out_dir, "captions.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(captions) + "\n")
    train_word_tokenizer(os.path.join(out_dir, "captions.txt"), os.path.join(out_dir, "tokenizer.json"))
    summary = {"n_train": n_train, "n_eval": n_eval, "num_frames": num_frames, "image_size": image_size,
               "shard_size": shard_size, "seed": seed, "video_format": video_format, "fps": FPS,
               "seconds": round(time.time() - start, 2)}
    write_summary(os.path.join(out_dir, "video.json"), summary)
    return summary
