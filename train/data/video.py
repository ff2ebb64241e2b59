"""The ``video`` sample kind: a clip (a video member or pre-extracted frames) + a caption.

Layout of one sample (WebDataset members grouped by ``KEY``)::

    KEY.mp4 | KEY.webm | KEY.mkv          the video, decoded with PyAV (``pip install vlmcore[video]``)
      or KEY.frame000.jpg, KEY.frame001.jpg, ...   pre-extracted frames (any image extension), in name order
      or KEY.npy                           pre-extracted frames as one uint8 array [F, H, W, 3]
    KEY.txt                                the caption (or "caption" in KEY.json)
    KEY.json                               optional: {"start": s, "end": e} seconds = the span to use;
                                           frames layouts need "fps" there to place a span

Frame sampling (:func:`frame_positions`): the span's frames are cut into ``num_frames`` equal
segments; evaluation takes the centre frame of each, training one random frame inside each (the
segment-based jitter of TSN, Wang et al. 2016, that video-text models such as ClipBERT and
Frozen-in-Time train with), drawn from the sample's own generator (``pipeline.sample_rng``) so a
resumed run draws the same frames. A clip with fewer frames than ``num_frames`` keeps them all; the
caller pads (``tasks.common.VideoDecoder``: zero frames + a frame mask).

Decoding is bounded and lazy: PyAV first demuxes the packets (no decoding) to learn every frame's
timestamp and the keyframes, then decodes only from the keyframe before each chosen frame, and
converts only the chosen frames to RGB. A clip of more than :data:`MAX_VIDEO_FRAMES` frames in its
span, a frame larger than ``data.max_image_pixels``, a corrupt or empty video are :class:`BadSample`
(``bad_video`` / ``image_too_large``): a counted skip, never a crash and never a worker stuck for
minutes on one sample.
"""

from __future__ import annotations

import bisect
import io
import math
import random
import re

import numpy as np
from PIL import Image
from vlmcore.train.config import DEFAULT_MAX_IMAGE_PIXELS
from vlmcore.train.data.pipeline import (
    IMAGE_EXTS,
    BadSample,
    check_readable,
    decode_image_pil,
    sample_caption,
    sample_json,
)

VIDEO_EXTS = ("mp4", "webm", "mkv")
# Frames in the decoded span at most: 10 minutes at 30 fps. The demux pass keeps one timestamp per
# frame and decoding may walk a keyframe interval per chosen frame; a longer span (a whole film in
# one sample, or a corrupt header) would hold a data worker for seconds and stall every step.
MAX_VIDEO_FRAMES = 18_000
_FRAME_MEMBER = re.compile(r"^(.+)\.(" + "|".join(IMAGE_EXTS) + r")$")


def frame_positions(count: int, num_frames: int, rng: random.Random | None = None) -> list[int]:
    """Indices (increasing) of the frames to use among ``count`` frames.

    ``count >= num_frames``: the frames are cut into ``num_frames`` equal segments ``[i*count/F,
    (i+1)*count/F)``; without ``rng`` the centre of each, with ``rng`` a uniform draw inside each
    (TSN-style jitter). ``count < num_frames``: all ``count`` frames (the caller pads).
    """
    if count < 1 or num_frames < 1:
        raise ValueError(f"count and num_frames must be >= 1, got {count} and {num_frames}")
    if count <= num_frames:
        return list(range(count))
    bounds = [i * count // num_frames for i in range(num_frames + 1)]
    if rng is None:
        return [int((i + 0.5) * count / num_frames) for i in range(num_frames)]
    return [rng.randrange(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def clip_span(sample: dict, meta) -> tuple[float, float]:
    """``(start, end)`` seconds of the span to use (``0, inf`` = all), from ``KEY.json``; :class:`BadSample`
    (``json_error``) for a span that is not two numbers with ``0 <= start < end``."""
    if not isinstance(meta, dict) or ("start" not in meta and "end" not in meta):
        return 0.0, math.inf
    try:
        start, end = float(meta.get("start", 0.0)), float(meta.get("end", math.inf))
    except (TypeError, ValueError):
        start = end = math.nan
    if not 0 <= start < end:  # NaN fails too
        raise BadSample(f"{sample['__key__']}.json: start / end must be seconds with 0 <= start < end, got "
                        f"{meta.get('start')!r} / {meta.get('end')!r}", "json_error")
    return start, end


def _frame_members(sample: dict) -> list[str]:
    """The pre-extracted frame members (``frame000.jpg`` ...), ordered by name with digit runs compared as numbers."""
    names = [ext for ext in sample if not ext.startswith("__") and _FRAME_MEMBER.match(ext)]
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


def video_fields(sample: dict, num_frames: int, rng: random.Random | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[list[Image.Image], str]:
    """(the chosen frames, at most ``num_frames`` RGB images in time order, caption) of a video sample.

    ``rng``: None for evaluation (segment centres), the sample's generator for training (jitter).
    Raises :class:`BadSample`; see the module docstring for the layout.
    """
    check_readable(sample)
    key = sample["__key__"]
    meta = sample_json(sample) if "json" in sample else None
    caption = sample_caption(sample, meta)
    span = clip_span(sample, meta)
    video = next((ext for ext in VIDEO_EXTS if ext in sample), None)
    frames = _frame_members(sample)
    if video is not None:
        return decode_video(sample[video], num_frames, span, rng, max_pixels, f"{key}.{video}"), caption
    if "npy" in sample:
        return _array_frames(sample["npy"], num_frames, _frame_span(span, meta, key), rng, f"{key}.npy"), caption
    if frames:
        chosen = _indices_in_span(len(frames), _frame_span(span, meta, key), num_frames, rng, f"{key} frames")
        return [decode_image_pil(sample[frames[i]], max_pixels) for i in chosen], caption
    if any(ext in sample for ext in IMAGE_EXTS):
        raise BadSample(f"sample {key} is an image-text pair in a video dataset; set kind: pairs", "kind_mismatch")
    members = sorted(k for k in sample if not k.startswith("__"))
    raise BadSample(f"sample {key} has no video member ({'/'.join(VIDEO_EXTS)}) and no frames "
                    f"(frame000.jpg ... or .npy); it has {members}", "bad_video")


def _frame_span(span: tuple[float, float], meta, key: str) -> tuple[float, float] | None:
    """The span as frame numbers for pre-extracted frames (``fps`` from ``KEY.json``); None = all frames."""
    if span == (0.0, math.inf):
        return None
    fps = meta.get("fps") if isinstance(meta, dict) else None
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise BadSample(f"{key}.json gives start / end but no positive 'fps': the frames of a frames layout "
                        "cannot be placed in time", "json_error")
    return span[0] * fps, span[1] * fps


def _indices_in_span(count: int, frame_span: tuple[float, float] | None, num_frames: int,
                     rng: random.Random | None, what: str) -> list[int]:
    """:func:`frame_positions` over the frames ``i`` of ``range(count)`` with ``start <= i < end``."""
    first, stop = (0, count) if frame_span is None else (math.ceil(frame_span[0]), min(count, math.ceil(frame_span[1])))
    if stop <= first:
        raise BadSample(f"{what}: no frame in the span (of {count} frames)", "bad_video")
    return [first + i for i in frame_positions(stop - first, num_frames, rng)]


def _array_frames(data: bytes, num_frames: int, frame_span, rng, what: str) -> list[Image.Image]:
    """The chosen frames of a ``uint8 [F, H, W, 3]`` ``.npy`` member."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / EOFError / OSError on bad files
        raise BadSample(f"{what} does not load: {type(e).__name__}: {e}", "bad_video") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise BadSample(f"{what} must be a uint8 array [F, H, W, 3] with F >= 1, got {array.dtype} "
                        f"{list(array.shape)}", "bad_video")
    chosen = _indices_in_span(array.shape[0], frame_span, num_frames, rng, what)
    return [Image.fromarray(array[i]) for i in chosen]


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError("video members (.mp4 / .webm / .mkv) are decoded with PyAV, which is not installed: "
                          "pip install vlmcore[video] (or pip install av)") from None
    return av


def decode_video(data: bytes, num_frames: int, span: tuple[float, float] = (0.0, math.inf),
                 rng: random.Random | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 what: str = "video") -> list[Image.Image]:
    """The chosen frames (:func:`frame_positions` over the frames whose time is in ``span``) of an
    encoded video; :class:`BadSample` when it does not decode or has no frame in the span."""
    av = _import_av()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise BadSample(f"{what} has no video stream", "bad_video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise BadSample(f"{what}: frames of {width} x {height} pixels are above the cap of {max_pixels} "
                                "(data.max_image_pixels), skipped undecoded", "image_too_large")
            times, keyframes = _frame_times(container, stream, span, what)
            targets = [times[i] for i in frame_positions(len(times), num_frames, rng)]
            return [Image.fromarray(a) for a in _decode_at(container, stream, targets, keyframes, what)]
    except BadSample:
        raise
    except Exception as e:  # FFmpeg's errors come as many types (InvalidDataError, EOFError, ValueError ...)
        raise BadSample(f"{what} does not decode: {type(e).__name__}: {e}", "bad_video") from None


def _frame_times(container, stream, span: tuple[float, float], what: str) -> tuple[list[int], list[int]]:
    """Demux only (nothing decoded): the presentation timestamps of the frames inside ``span`` and of
    every keyframe, both sorted, in the stream's time base."""
    base = float(stream.time_base)
    times, keyframes = [], []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:  # the demuxer's final flush packet
            continue
        if packet.is_keyframe:
            keyframes.append(packet.pts)
        if span[0] <= packet.pts * base < span[1]:
            times.append(packet.pts)
            if len(times) > MAX_VIDEO_FRAMES:
                raise BadSample(f"{what} has more than {MAX_VIDEO_FRAMES} frames in its span (vlmcore.train.data."
                                "video.MAX_VIDEO_FRAMES); cut it into clips with start / end", "bad_video")
    if not times:
        where = "" if span == (0.0, math.inf) else f" in [{span[0]}, {span[1]}) s"
        raise BadSample(f"{what} has no frame{where}", "bad_video")
    return sorted(times), sorted(keyframes)


def _decode_at(container, stream, targets: list[int], keyframes: list[int], what: str) -> list[np.ndarray]:
    """RGB ``[H, W, 3]`` arrays of the first frame at or after each target timestamp (increasing).

    Decoding continues from the previous target when no keyframe lies between; otherwise it seeks to
    the keyframe before the target, so a long span costs about one keyframe interval per target.
    """
    out, frames, last = [], None, None
    for target in targets:
        k = bisect.bisect_right(keyframes, target) - 1
        keyframe = keyframes[k] if k >= 0 else 0
        if frames is None or keyframe > last:
            container.seek(keyframe, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            if frame.pts is None:
                continue
            last = frame.pts
            if frame.pts >= target:
                out.append(frame.to_ndarray(format="rgb24"))  # the only frames converted to RGB
                break
        else:
            raise BadSample(f"{what}: decoding ended before the frame at timestamp {target}", "bad_video")
    return out
