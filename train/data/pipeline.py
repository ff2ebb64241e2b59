"""WebDataset input pipeline: image-text pairs and MMC4 interleaved documents.

Shards are plain tar files in the WebDataset layout (members ``KEY.EXT`` grouped by ``KEY``),
given as local paths, brace patterns (``/data/laion-{000000..000099}.tar``) or globs
(:func:`expand_shards`; :func:`open_shard` is the one place a shard file is opened).

- **Pairs**: ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` (or ``"caption"`` in ``KEY.json``).
- **Interleaved documents** (MMC4): ``KEY.json`` = ``{"text_list": [str, ...], "image_info":
  [{"matched_text_index": i, "matched_sim": s, <image>}, ...]}`` where ``<image>`` is either
  ``"image_name": "img0.png"`` with the image stored in the same sample as ``KEY.img0.png`` (our
  layout), or ``"image_base64": "..."`` inline (OpenFlamingo's MMC4 shards: the sample is only
  ``KEY.json``). With ``min_similarity`` > 0, images whose ``matched_sim`` (else
  ``similarity_matrix[i][matched_text_index]``) is below it are dropped, as OpenFlamingo's
  ``--mmc4_textsim_threshold`` does. An image is placed before the sentence it matches:
  ``<image>sentence ...<|endofchunk|><image>sentence ...<|endofchunk|><eos>``.
- **Videos**: ``KEY.mp4|webm|mkv`` or pre-extracted frames + ``KEY.txt``; see :mod:`.video`.

Training streams are infinite and deterministic: a function of (seed, rank, worker) only.
Per epoch, the shard list is shuffled (``resampled: false``; shards split over rank x worker, or
samples when there are fewer shards than readers) or shards are drawn with replacement per
reader (``resampled: true``). A shuffle buffer follows, then decoding. Samples that fail (corrupt
image, missing member, undecodable text or JSON, wrong kind) are skipped and counted per reason
(:data:`SKIP_REASONS`); ``max_consecutive_bad`` failures in a row end the stream with a
:class:`NoUsableSamplesError` that names the dataset, the shards and the reasons.

Resume by position: every raw sample has a position ``(epoch, shard index, sample offset)`` in
its reader's stream. A reader's state is the position of its next raw sample, the positions of
the samples in its shuffle buffer, the number of draws from the buffer (the buffer's random
choices are a function of the draw index) and its skip counts. Every batch carries its worker's
state; :class:`DataStream` keeps the state of the last batch it handed out. Resuming opens no
shard before the current one, skips the samples before the offset by reading tar headers only,
re-reads (without decoding) the few samples that were waiting in the shuffle buffer, and rotates
the DataLoader's worker round-robin so the next batch comes from the worker that was next.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import copy
import io
import json
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from vlmcore.train.config import DEFAULT_MAX_IMAGE_PIXELS
from vlmcore.train.data.preprocess import ImageTransform
from vlmcore.train.data.shards import expand_shard_spec, open_shard
from vlmcore.train.data.tokenizer import EOC, MEDIA, Tokenizer

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IGNORE_INDEX = -100

# Why a sample was skipped (the keys of the skip counts; ``skipped/<dataset>/<reason>`` in the metrics).
SKIP_REASONS = (
    "unreadable_shard",  # the tar is truncated / not a tar (the rest of the shard is lost)
    "no_samples",  # a whole shard held no sample for this reader (empty, or fewer samples than readers)
    "kind_mismatch",  # a document in a pairs dataset or a pair in an interleaved one
    "missing_image",  # a pair with no KEY.jpg|jpeg|png|webp
    "missing_caption",  # a pair with no KEY.txt and no "caption" in KEY.json
    "empty_caption",
    "not_utf8",  # a text member that is not UTF-8
    "json_error",  # KEY.json missing, not JSON, or without the fields the layout needs
    "missing_member",  # a document's image_name with no KEY.<image_name> member
    "missing_similarity",  # min_similarity is set but an image has no matched_sim / similarity_matrix
    "no_image",  # a document with no image left (none given, or all below min_similarity)
    "undecodable_image",  # PIL cannot decode the bytes (or image_base64 is not base64)
    "image_too_large",  # more pixels than data.max_image_pixels (refused from its header, never decoded)
    "bad_video",  # a video sample whose clip does not decode: corrupt / empty / too long / no frame in its span
    "other",
)


class BadSample(Exception):
    """A sample that cannot be used; it is skipped and counted under ``reason`` (one of :data:`SKIP_REASONS`)."""

    def __init__(self, message: str, reason: str = "other"):
        super().__init__(message)
        self.reason = reason if reason in SKIP_REASONS else "other"


class NoUsableSamplesError(RuntimeError):
    """A stream produced no usable sample in ``max_consecutive_bad`` attempts in a row."""


def expand_shards(spec) -> list[str]:
    """Shard URLs of ``spec`` (paths, brace patterns, globs, ``pipe:`` / s3 / http(s) URLs, ``a::b``
    lists; see :mod:`.shards`); raises ValueError if a local file is missing."""
    return expand_shard_spec(spec)


class _EndMarkerTarInfo(tarfile.TarInfo):
    """A TarInfo that marks its TarFile (``reached_end_marker``) when it reads the end-of-archive block.

    tarfile ends its iteration silently both there and where a header should follow but the file is
    cut short (an empty or partial block) or holds garbage; only the marker says the shard is whole.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.reached_end_marker = True
            raise


def read_tar(path: str, skip: int = 0, select: set[int] | None = None) -> Iterator[dict]:
    """Samples of one shard: ``{"__key__", "__url__", "__offset__", ext: bytes, ...}`` in file order.

    ``__offset__`` is the sample's index in the shard. Samples with an offset below ``skip`` or
    not in ``select`` (if given) are passed over reading their tar headers only: their data is
    neither read (on a seekable file, tarfile seeks past it) nor yielded. A sample is yielded once
    the next sample's header (or the end-of-archive marker) shows it whole. A shard that cannot be
    read to its end (truncated, not a tar, a failed stream) ends there with one damage record
    ``{"__key__": ..., "__error__": message, "__reason__": "unreadable_shard"}``, so that the damage
    is counted as skipped for what it is: it replaces the sample being read at the cut (which may
    lack members); after a whole tar (a stream whose command fails after the tar's end) it follows
    the last sample. The samples before it are yielded. Returns (``StopIteration.value``) the number
    of samples in the shard (the damage record counted as one).
    """

    def wanted(offset: int) -> bool:
        return offset >= skip and (select is None or offset in select)

    current: dict | None = None
    offset, key = -1, None
    whole = False  # the end-of-archive marker was read: the last sample is complete
    damage = None
    try:
        with open_shard(path) as f, tarfile.open(fileobj=f, mode="r:" if f.seekable() else "r|",
                                                 tarinfo=_EndMarkerTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                member_key = os.path.join(os.path.dirname(member.name), stem)
                if member_key != key:
                    if current is not None:
                        yield current
                        current = None
                    key, offset = member_key, offset + 1
                    if wanted(offset):
                        current = {"__key__": key, "__url__": path, "__offset__": offset}
                if current is not None:
                    current[ext.lower()] = tar.extractfile(member).read()
            whole = getattr(tar, "reached_end_marker", False)
            if not whole:
                damage = f"it ends without the tar end-of-archive marker at byte {tar.offset} (cut short?)"
    except (tarfile.TarError, OSError, EOFError) as e:
        damage = str(e)
    if whole and current is not None:
        yield current
    if damage is None:
        return offset + 1
    offset = offset + 1 if whole else max(offset, 0)  # a cut before the first header damages sample 0
    if wanted(offset):
        yield {"__key__": f"{path}#error", "__url__": path, "__offset__": offset,
               "__error__": f"unreadable shard {path}: {damage}", "__reason__": "unreadable_shard"}
    return offset + 1


def reader_shards(shards: list[str], seed: int, reader: int, readers: int, resampled: bool,
                  epoch: int) -> tuple[list[str], bool]:
    """The shards reader ``reader`` of ``readers`` reads in ``epoch``, in order, and whether it takes
    only every ``readers``-th sample of them (fewer shards than readers). Opens nothing."""
    if resampled:
        rng = random.Random(f"{seed}-resampled-{reader}-{epoch}")
        return [rng.choice(shards) for _ in range(len(shards))], False
    order = list(shards)
    random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
    if len(order) >= readers:
        return order[reader::readers], False
    return order, True


def raw_stream(shards: list[str], seed: int, reader: int, readers: int, resampled: bool,
               start: tuple[int, int, int] = (0, 0, 0)) -> Iterator[dict]:
    """The infinite raw-sample stream of reader ``reader`` of ``readers`` (= rank * workers + worker),
    from position ``start`` = (epoch, shard index, sample offset); every sample gets its ``__pos__``.

    Shards before the start's shard index are not opened; samples before its offset are skipped
    by header. A shard that holds no sample for this reader yields one ``no_samples`` marker (so
    that a stream over empty shards is counted, and stopped, instead of spinning forever).
    """
    epoch, first_shard, first_offset = start
    while True:
        paths, split = reader_shards(shards, seed, reader, readers, resampled, epoch)
        for index in range(first_shard, len(paths)):
            skip = first_offset if index == first_shard else 0
            samples = read_tar(paths[index], skip=skip)
            while True:
                try:
                    sample = next(samples)
                except StopIteration as end:
                    count = end.value
                    break
                offset = sample.pop("__offset__")
                if split and (offset + index) % readers != reader:
                    continue
                sample["__pos__"] = (epoch, index, offset)
                yield sample
            owned = count if not split else sum((o + index) % readers == reader for o in range(count))
            if owned == 0 and skip <= count:
                yield {"__key__": f"{paths[index]}#empty", "__url__": paths[index], "__pos__": (epoch, index, count),
                       "__reason__": "no_samples",
                       "__error__": f"shard {paths[index]} has no sample for reader {reader} of {readers} "
                                    f"({count} sample(s) in it)"}
        epoch, first_shard, first_offset = epoch + 1, 0, 0


def reread(shards: list[str], seed: int, reader: int, readers: int, resampled: bool,
           positions: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], dict]:
    """The raw samples at ``positions`` (read again, not decoded), keyed by position."""
    by_shard = collections.defaultdict(set)
    for epoch, index, offset in positions:
        by_shard[(epoch, index)].add(offset)
    found = {}
    for (epoch, index), offsets in sorted(by_shard.items()):
        path = reader_shards(shards, seed, reader, readers, resampled, epoch)[0][index]
        for sample in read_tar(path, skip=min(offsets), select=offsets):
            pos = (epoch, index, sample.pop("__offset__"))
            found[pos] = {**sample, "__pos__": pos}
    missing = [p for p in positions if tuple(p) not in found]
    if missing:
        raise ValueError(f"resume: {len(missing)} buffered sample(s) not found again in their shards "
                         f"(first: {missing[0]}); the shards changed since the checkpoint")
    return found


def shuffled(samples: Iterator[dict], buffer: int, seed: str, pool: list[dict] | None = None,
             draws: int = 0) -> Iterator[tuple[dict, list[dict], int]]:
    """Reservoir shuffle with a buffer of ``buffer`` samples (0 or 1 = no shuffling).

    Yields ``(sample, pool, draws)``: the pool (the samples waiting, after the draw) and the number
    of draws so far are the shuffle's resumable state; ``pool``/``draws`` given resume it. Draw
    ``n`` picks a slot with ``random.Random(f"{seed}-{n}")``, so the state holds no RNG.
    """
    if buffer <= 1:
        for sample in samples:
            draws += 1
            yield sample, [], draws
        return
    pool = list(pool or [])
    for sample in samples:
        if len(pool) < buffer:
            pool.append(sample)
            continue
        slot = random.Random(f"{seed}-{draws}").randrange(buffer)
        out, pool[slot] = pool[slot], sample
        draws += 1
        yield out, pool, draws


# ----------------------------------------------------------------------------------------- decode


def decode_image(data: bytes, image_size: int, transform: ImageTransform | None = None,
                 rng: random.Random | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """PIL-decode ``data`` into a normalized ``[3, image_size, image_size]`` float tensor.

    ``transform`` (:mod:`.preprocess`; ``rng`` for its random crop, see :func:`sample_rng`) defaults
    to a squash resize with OpenAI CLIP's mean / std. An image of more than ``max_pixels`` pixels
    (``data.max_image_pixels``) raises :class:`BadSample` (``image_too_large``) before its pixels are
    decoded (see :func:`_open_within`).
    """
    transform = transform or ImageTransform(size=image_size, resize_mode="squash")
    return transform(decode_image_pil(data, max_pixels), rng)


def decode_image_pil(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """PIL-decode ``data`` into an RGB image; :class:`BadSample` (``undecodable_image``, or
    ``image_too_large`` above ``max_pixels``, refused before its pixels are decoded)."""
    try:
        with _pil_pixel_limit(max_pixels), _open_within(data, max_pixels) as img:
            return img.convert("RGB")
    except BadSample:
        raise
    except Image.DecompressionBombError as e:  # PIL's guard: above twice the cap, or a frame met while decoding
        raise BadSample(f"image is {_cap_text(max_pixels)} (PIL: {e})", "image_too_large") from None
    except Exception as e:  # PIL raises many types on corrupt data
        raise BadSample(f"image does not decode: {type(e).__name__}: {e}", "undecodable_image") from None


def _cap_text(max_pixels: int) -> str:
    return (f"above the cap of {max_pixels} pixels (data.max_image_pixels; vlmcore-capfilt --max-image-pixels), "
            "skipped undecoded")


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, process-wide) at ``max_pixels``
    while one image is opened and decoded, then back to what it was.

    At its default (89 M pixels) the guard would refuse images that a higher cap allows; at the cap it
    also bounds the sizes PIL meets only while decoding (GIF frames, ICO entries). It raises
    ``DecompressionBombError`` above twice its limit and only warns between the limit and twice it.
    """
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def _open_within(data: bytes, max_pixels: int) -> Image.Image:
    """``Image.open`` of ``data``: its header read, its pixels not decoded; :class:`BadSample`
    (``image_too_large``) when its width x height is above ``max_pixels``. PIL's warning for sizes
    between its limit and twice it is silenced: this check refuses those images with their size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise BadSample(f"image of {width} x {height} = {width * height} pixels is {_cap_text(max_pixels)}",
                        "image_too_large")
    return img


def sample_rng(seed: int, sample: dict) -> random.Random:
    """The random crops' generator of one sample: a function of (seed, shard URL, key) only, so it is
    drawn on the data workers and a resumed run (which skips samples undecoded) crops identically."""
    return random.Random(f"{seed}-{sample.get('__url__')}-{sample['__key__']}")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample(f"{what} is not UTF-8: {e}", "not_utf8") from None


def sample_json(sample: dict) -> object:
    """The parsed ``KEY.json`` of ``sample``; :class:`BadSample` (``json_error`` / ``not_utf8``) when it is not JSON."""
    try:
        return json.loads(_text(sample["json"], f"{sample['__key__']}.json"))
    except ValueError as e:
        raise BadSample(f"{sample['__key__']}.json is not JSON: {e}", "json_error") from None


def _is_document(meta) -> bool:
    return isinstance(meta, dict) and "text_list" in meta and "image_info" in meta


def check_readable(sample: dict) -> None:
    """:class:`BadSample` for the damage record of an unreadable shard (see :func:`read_tar`)."""
    if "__error__" in sample:
        raise BadSample(sample["__error__"], sample.get("__reason__", "unreadable_shard"))


def pair_fields(sample: dict) -> tuple[bytes, str]:
    """(image bytes, caption) of a pair sample; raises :class:`BadSample`."""
    check_readable(sample)
    key = sample["__key__"]
    meta = sample_json(sample) if "json" in sample else None
    if _is_document(meta):
        raise BadSample(f"{key}.json is an interleaved document (text_list + image_info) in a pairs dataset; "
                        "set kind: interleaved for this dataset", "kind_mismatch")
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"missing image member '{key}.jpg' (or .jpeg/.png/.webp; sample has {members})",
                        "missing_image")
    return image, sample_caption(sample, meta)


def sample_caption(sample: dict, meta) -> str:
    """The caption of a pair or video sample: ``KEY.txt``, else ``"caption"`` of its parsed ``KEY.json``
    (``meta``, None when there is none); raises :class:`BadSample` (missing / empty / not UTF-8)."""
    key = sample["__key__"]
    if "txt" in sample:
        caption = _text(sample["txt"], f"{key}.txt")
    elif isinstance(meta, dict) and "caption" in meta:
        caption = str(meta["caption"]).strip()
    else:
        keys = sorted(meta) if isinstance(meta, dict) else None
        where = f"; {key}.json has keys {keys} but no 'caption'" if keys is not None else ""
        raise BadSample(f"missing caption member '{key}.txt'{where}", "missing_caption")
    if not caption:
        raise BadSample(f"sample {key} has an empty caption", "empty_caption")
    return caption


def _similarity(doc: dict, i: int, info: dict, key: str) -> float:
    if "matched_sim" in info:
        return float(info["matched_sim"])
    matrix = doc.get("similarity_matrix")
    if matrix is not None:
        return float(matrix[i][int(info["matched_text_index"])])
    raise BadSample(f"document {key}: image_info[{i}] has no matched_sim and the json no similarity_matrix "
                    "(needed by min_image_similarity)", "missing_similarity")


def drop_dissimilar_images(sample: dict, min_similarity: float) -> dict:
    """``sample`` with the MMC4 ``image_info`` entries whose image-text similarity is below
    ``min_similarity`` removed (OpenFlamingo's ``--mmc4_textsim_threshold``, 0.24 in its runs).

    The similarity is the entry's ``matched_sim``, else ``similarity_matrix[i][matched_text_index]``
    (images x sentences). A document left without images raises :class:`BadSample` (``no_image``);
    anything that is not a well-formed document passes unchanged (:func:`doc_fields` names it).
    """
    if min_similarity <= 0 or "json" not in sample or "__error__" in sample:
        return sample
    try:
        doc = json.loads(sample["json"].decode("utf-8"))
    except ValueError:
        return sample
    if not _is_document(doc):
        return sample
    try:
        keep = [i for i, info in enumerate(doc["image_info"])
                if _similarity(doc, i, info, sample["__key__"]) >= min_similarity]
    except (ValueError, KeyError, TypeError, IndexError):
        return sample
    if not keep:
        raise BadSample(f"document {sample['__key__']} has no image with matched_sim >= {min_similarity}",
                        "no_image")
    doc["image_info"] = [doc["image_info"][i] for i in keep]
    if doc.get("similarity_matrix") is not None:
        doc["similarity_matrix"] = [doc["similarity_matrix"][i] for i in keep]
    return {**sample, "json": json.dumps(doc).encode()}


def doc_fields(sample: dict, max_images: int) -> tuple[list[bytes], str]:
    """(image bytes in order, text with ``<image>``/``<|endofchunk|>`` markers) of an MMC4 document.

    Each ``image_info`` entry holds its image inline (``image_base64``, OpenFlamingo's layout) or
    names a member of the sample (``image_name`` -> ``KEY.<image_name>``, ours). A sentence keeps
    one image (the last one matched to it); the first ``max_images`` images are kept. (The
    similarity threshold is applied before, by :func:`drop_dissimilar_images`.)
    """
    check_readable(sample)
    key = sample["__key__"]
    if "json" not in sample:
        if any(e in sample for e in IMAGE_EXTS) and "txt" in sample:
            raise BadSample(f"sample {key} is an image-text pair in an interleaved dataset; set kind: pairs",
                            "kind_mismatch")
        raise BadSample(f"missing document member '{key}.json'", "json_error")
    doc = sample_json(sample)
    if not _is_document(doc):
        if any(e in sample for e in IMAGE_EXTS):
            raise BadSample(f"sample {key} is an image-text pair in an interleaved dataset; set kind: pairs",
                            "kind_mismatch")
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise BadSample(f"{key}.json has no 'text_list' and 'image_info' (keys: {keys})", "json_error")
    try:
        texts = [str(t) for t in doc["text_list"]]
        by_sentence = {}
        for info in doc["image_info"]:
            if "image_base64" not in info and "image_name" not in info:
                raise KeyError("image_base64 or image_name")
            by_sentence[int(info["matched_text_index"])] = info
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise BadSample(f"{key}.json image_info is malformed: {type(e).__name__}: {e}", "json_error") from None
    images, parts = [], []
    for i, sentence in enumerate(texts):
        info = by_sentence.get(i)
        if info is not None and len(images) < max_images:
            images.append(_image_bytes(sample, info, key))
            if len(images) > 1:
                parts.append(EOC)
            parts.append(MEDIA)
        parts.append(sentence)
    if not images:
        raise BadSample(f"document {key} has no image", "no_image")
    parts.append(EOC)
    return images, " ".join(parts)


def _image_bytes(sample: dict, info: dict, key: str) -> bytes:
    if "image_base64" in info:
        try:
            return base64.b64decode(info["image_base64"], validate=True)
        except (binascii.Error, ValueError, TypeError) as e:
            raise BadSample(f"document {key}: image_base64 does not decode: {e}", "undecodable_image") from None
    name = str(info["image_name"])
    if name.lower() not in sample:
        raise BadSample(f"missing image member '{key}.{name}' (named by image_info)", "missing_member")
    return sample[name.lower()]


#: A per-sample encoder: raw sample -> dict of example tensors; raises :class:`BadSample`. Each task
#: builds its own (``Task.encoder`` in ``train/tasks/``) from the helpers of this module.
Encoder = Callable[[dict], dict]


def lm_text(tok: Tokenizer, ids: list[int]) -> dict:
    """input_ids / attention_mask / labels ``[T]`` (pad and media positions ignored) of an LM sequence:
    ``ids`` cut to ``T - 1``, then ``<eos>``, then padding to ``T = tok.context_length``."""
    ids = ids[: tok.context_length - 1] + [tok.eos_token_id]
    ids, mask = tok.pad(ids)
    labels = [i if m and i != tok.media_token_id else IGNORE_INDEX for i, m in zip(ids, mask)]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def collate(examples: list[dict]) -> dict:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def batch_tokens(batch: dict, pad_token_id: int = 0, eos_token_id: int | None = None) -> int:
    """Non-padding text tokens in a batch (for tokens/s).

    CLIP ``tokens`` rows are text + ``<eos>`` + padding: each row counts up to its first ``eos_token_id``
    (right even when the pad token is the eos token, as in OpenAI's CLIP tokenizer), else its
    non-``pad_token_id`` positions.
    """
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "tokens" not in batch:
        return 0
    tokens = batch["tokens"]
    lengths = (tokens != pad_token_id).sum(dim=1)
    if eos_token_id is not None:
        is_eos = tokens == eos_token_id
        lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, lengths)
    return int(lengths.sum())


# ---------------------------------------------------------------------------------------- streams


def initial_state(num_workers: int) -> dict:
    """The stream state of a fresh start: per worker, the position of its next raw sample
    ``raw = [epoch, shard index, offset]``, its shuffle buffer, its draws and its skip counts."""
    return {"batches": 0, "workers": [{"raw": [0, 0, 0], "buffer": [], "draws": 0, "skips": {}}
                                      for _ in range(max(1, num_workers))]}


def _buffer_entry(sample: dict):
    """How a buffered sample is saved: its position, or (a marker / broken-shard record) itself."""
    if "__error__" in sample:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sample.items() if k.startswith("__")}
    return list(sample["__pos__"])


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite batches of one dataset for one rank; split over DataLoader workers.

    Each batch is a dict of stacked tensors plus ``_worker`` (logical worker id) and ``_state``
    (that worker's resumable state after the batch, see :func:`initial_state`). ``start`` resumes.
    Documents first lose their images below ``min_image_similarity`` (:func:`drop_dissimilar_images`).
    A run of ``max_consecutive_bad`` unusable samples yields one ``{"_error": message}`` instead
    of a batch and ends the worker's stream (:class:`DataStream` raises it).
    """

    def __init__(self, shards: list[str], encoder, batch_size: int, *, seed: int, rank: int,
                 world_size: int, num_workers: int, shuffle_buffer: int, resampled: bool, start: dict | None = None,
                 name: str = "data", max_consecutive_bad: int = 5000, min_image_similarity: float = 0.0):
        super().__init__()
        if max_consecutive_bad < 1:
            raise ValueError(f"max_consecutive_bad: must be >= 1, got {max_consecutive_bad}")
        self.shards, self.encoder, self.batch_size = shards, encoder, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.resampled = max(1, num_workers), shuffle_buffer, resampled
        self.name, self.max_consecutive_bad = name, max_consecutive_bad
        self.min_image_similarity = min_image_similarity
        self.start = start or initial_state(self.num_workers)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        # The DataLoader always asks worker 0 first: rotate so the logical worker that is due comes first.
        worker = (physical + self.start["batches"]) % self.num_workers
        reader = self.rank * self.num_workers + worker
        readers = self.world_size * self.num_workers
        where = (self.shards, self.seed, reader, readers, self.resampled)
        state = self.start["workers"][worker]
        refs = [tuple(e) for e in state["buffer"] if isinstance(e, list)]
        found = reread(*where, refs) if refs else {}
        pool = [found[tuple(e)] if isinstance(e, list) else dict(e) for e in state["buffer"]]
        next_raw = list(state["raw"])

        def tracked(samples):
            for sample in samples:
                epoch, index, offset = sample["__pos__"]
                next_raw[:] = [epoch, index, offset + 1]
                yield sample

        stream = shuffled(tracked(raw_stream(*where, start=tuple(state["raw"]))), self.shuffle_buffer,
                          f"{self.seed}-shuffle-{reader}", pool, state["draws"])
        skips = collections.Counter(state["skips"])
        run = collections.Counter()  # reasons of the current run of unusable samples
        first_message: dict[str, str] = {}
        run_shards: list[str] = []
        examples = []
        for sample, pool, draws in stream:
            try:
                examples.append(self.encoder(drop_dissimilar_images(sample, self.min_image_similarity)))
            except BadSample as e:
                skips[e.reason] += 1
                run[e.reason] += 1
                first_message.setdefault(e.reason, str(e))
                if sample.get("__url__") not in run_shards:
                    run_shards.append(sample.get("__url__"))
                if sum(run.values()) >= self.max_consecutive_bad:
                    yield {"_error": self._no_usable_message(run, first_message, run_shards, reader, readers)}
                    return
                continue
            run.clear()
            first_message.clear()
            run_shards.clear()
            if len(examples) == self.batch_size:
                batch = collate(examples)
                batch["_worker"] = worker
                batch["_state"] = {"raw": list(next_raw), "buffer": [_buffer_entry(s) for s in pool],
                                   "draws": draws, "skips": dict(skips)}
                yield batch
                examples = []

    def _no_usable_message(self, run, first_message, run_shards, reader, readers) -> str:
        total = sum(run.values())
        shown = ", ".join(str(s) for s in run_shards[:3]) + (f" and {len(run_shards) - 3} more"
                                                              if len(run_shards) > 3 else "")
        reasons = "; ".join(f"{n} {reason} (first: {first_message[reason]})" for reason, n in run.most_common())
        return (f"dataset {self.name!r}: 0 of {total} samples usable in a row (reader {reader} of {readers}, "
                f"shard(s) {shown}): {reasons}. Does the shard use another layout? pairs: KEY.jpg|jpeg|png|webp + "
                "KEY.txt (or 'caption' in KEY.json); interleaved: KEY.json with text_list + image_info "
                "(image_name members or image_base64); video: KEY.mp4|webm|mkv or frames (KEY.frame000.jpg ... or "
                "KEY.npy) + KEY.txt. If the data is only very noisy, raise "
                "data.max_consecutive_bad_samples.")


class DataStream:
    """One dataset's DataLoader for this rank, with its resumable position (:meth:`state_dict`) and
    its skipped-sample counts per reason (:attr:`skip_counts`)."""

    def __init__(self, name: str, dataset: ShardStream, num_workers: int, weight: float = 1.0):
        self.name, self.dataset, self.weight = name, dataset, weight
        self.num_workers = num_workers
        self.state = copy.deepcopy(dataset.start)
        self._iter = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self.dataset.start = self.state_dict()
            # An own generator: creating the iterator must not draw from the global torch RNG (which
            # a resumed run restores exactly; the uninterrupted run created its iterator at step 1).
            generator = torch.Generator().manual_seed(self.dataset.seed)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, generator=generator,
                persistent_workers=self.num_workers > 0, prefetch_factor=2 if self.num_workers else None)
            self._iter = iter(loader)
        batch = next(self._iter)
        if "_error" in batch:
            self._iter = None  # shuts the workers down
            raise NoUsableSamplesError(batch["_error"])
        worker = int(batch.pop("_worker"))
        self.state["workers"][worker] = batch.pop("_state")
        self.state["batches"] += 1
        return batch

    @property
    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far on this rank, per reason (only reasons that occurred)."""
        total = collections.Counter()
        for worker in self.state["workers"]:
            total.update(worker["skips"])
        return {reason: total[reason] for reason in SKIP_REASONS if total[reason]}

    @property
    def skipped(self) -> int:
        return sum(self.skip_counts.values())

    def state_dict(self) -> dict:
        return copy.deepcopy(self.state)

    def load_state_dict(self, state: dict) -> None:
        if "workers" not in state:
            raise ValueError(f"dataset {self.name!r}: the checkpoint's data state has an older format "
                             "(sample counts, not positions); it cannot be resumed by this version")
        if len(state["workers"]) != len(self.state["workers"]):
            raise ValueError(f"dataset {self.name!r}: checkpoint has {len(state['workers'])} data workers, "
                             f"this run {len(self.state['workers'])}; resume with the same data.num_workers")
        self.state = copy.deepcopy(state)
        self._iter = None


def eval_batches(shards: list[str], encoder: Encoder, batch_size: int, rank: int, world_size: int,
                 max_batches: int = 0) -> Iterator[tuple[dict, list[dict]]]:
    """One pass over held-out pairs, samples split over ranks: yields (batch, per-sample json meta)."""
    examples, metas, n = [], [], 0
    index = 0
    for path in shards:
        for sample in read_tar(path):
            index += 1
            if (index - 1) % world_size != rank:
                continue
            try:
                example = encoder(sample)
                meta = json.loads(sample["json"]) if "json" in sample else {}
            except (BadSample, ValueError):
                continue
            examples.append(example)
            metas.append(meta)
            if len(examples) == batch_size:
                yield collate(examples), metas
                examples, metas, n = [], [], n + 1
                if max_batches and n >= max_batches:
                    return
    if examples:
        yield collate(examples), metas
