"""WebDataset input pipeline: image-text pairs and MMC4-like interleaved documents.

Shards are plain tar files in the WebDataset layout (members ``KEY.EXT`` grouped by ``KEY``),
given as local paths, brace patterns (``/data/laion-{000000..000099}.tar``) or globs.

- **Pairs**: ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` (or ``"caption"`` in ``KEY.json``).
- **Interleaved documents** (MMC4-like): ``KEY.json`` = ``{"text_list": [str, ...], "image_info":
  [{"image_name": "img0.png", "matched_text_index": i}, ...]}`` with each image stored in the same
  sample as ``KEY.<image_name>`` (e.g. ``KEY.img0.png``). An image is placed before the sentence
  it matches: ``<image>sentence ...<|endofchunk|><image>sentence ...<|endofchunk|><eos>``.

Training streams are infinite and deterministic: a function of (seed, rank, worker) only.
Per epoch, the shard list is shuffled (``resampled: false``; shards split over rank x worker, or
samples when there are fewer shards than readers) or shards are drawn with replacement per
reader (``resampled: true``). A shuffle buffer follows, then decoding. Samples that fail (corrupt
image, missing key, undecodable text or JSON) are skipped and counted.

Exact resume: every batch carries its worker's position (samples taken from the shuffle buffer,
good or bad) and skip count. :class:`DataStream` tracks them; on resume each worker fast-forwards
its raw stream (tar reads, no decoding) to the saved position, and the DataLoader's worker
round-robin is rotated so the next batch comes from the worker that was next.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from .preprocess import ImageTransform
from .shards import expand_shard_spec, open_shard
from .tokenizer import EOC, MEDIA, Tokenizer

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IGNORE_INDEX = -100


class BadSample(Exception):
    """A sample that cannot be decoded; it is skipped and counted."""


def expand_shards(spec) -> list[str]:
    """Shard URLs of ``spec`` (paths, brace patterns, globs, ``pipe:`` / s3 / http(s) URLs, ``a::b``
    lists; see :mod:`.shards`); raises ValueError if a local file is missing."""
    return expand_shard_spec(spec)


def read_tar(path: str) -> Iterator[dict]:
    """Samples of one shard: ``{"__key__", "__url__", ext: bytes, ...}`` in file order.

    A shard that cannot be read (truncated / not a tar) ends early; the damage is reported as one
    sample ``{"__key__": ..., "__error__": message}`` so that it is counted as skipped.
    """
    current: dict | None = None
    try:
        with open_shard(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(member.name), stem)
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": path}
                current[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        if current is not None:
            yield current
            current = None
        yield {"__key__": f"{path}#error", "__url__": path, "__error__": f"unreadable shard: {e}"}
    if current is not None:
        yield current


def raw_stream(shards: list[str], seed: int, reader: int, readers: int, resampled: bool) -> Iterator[dict]:
    """The infinite raw-sample stream of reader ``reader`` of ``readers`` (= rank * workers + worker)."""
    epoch = 0
    while True:
        if resampled:
            rng = random.Random(f"{seed}-resampled-{reader}-{epoch}")
            for _ in range(len(shards)):
                yield from read_tar(rng.choice(shards))
        else:
            order = list(shards)
            random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
            if len(order) >= readers:
                for path in order[reader::readers]:
                    yield from read_tar(path)
            else:
                index = 0
                for path in order:
                    for sample in read_tar(path):
                        if index % readers == reader:
                            yield sample
                        index += 1
        epoch += 1


def shuffled(samples: Iterator[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir shuffle with a buffer of ``buffer`` samples (0 or 1 = no shuffling)."""
    if buffer <= 1:
        yield from samples
        return
    pool: list[dict] = []
    for sample in samples:
        if len(pool) < buffer:
            pool.append(sample)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = sample
    rng.shuffle(pool)
    yield from pool


# ----------------------------------------------------------------------------------------- decode


def decode_image(data: bytes, image_size: int, transform: ImageTransform | None = None,
                 rng: random.Random | None = None) -> torch.Tensor:
    """PIL-decode ``data`` into a normalized ``[3, image_size, image_size]`` float tensor.

    ``transform`` (:mod:`.preprocess`; ``rng`` for its random crop, see :func:`sample_rng`) defaults
    to a squash resize with OpenAI CLIP's mean / std.
    """
    transform = transform or ImageTransform(size=image_size, resize_mode="squash")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
    except Exception as e:  # PIL raises many types on corrupt data
        raise BadSample(f"image does not decode: {type(e).__name__}: {e}") from None
    return transform(img, rng)


def sample_rng(seed: int, sample: dict) -> random.Random:
    """The random crops' generator of one sample: a function of (seed, shard URL, key) only, so it is
    drawn on the data workers and a resumed run (which skips samples undecoded) crops identically."""
    return random.Random(f"{seed}-{sample.get('__url__')}-{sample['__key__']}")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample(f"{what} is not UTF-8: {e}") from None


def pair_fields(sample: dict) -> tuple[bytes, str]:
    """(image bytes, caption) of a pair sample; raises :class:`BadSample`."""
    if "__error__" in sample:
        raise BadSample(sample["__error__"])
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        raise BadSample(f"sample {sample['__key__']} has no image ({'/'.join(IMAGE_EXTS)})")
    if "txt" in sample:
        caption = _text(sample["txt"], "txt")
    elif "json" in sample:
        try:
            caption = str(json.loads(_text(sample["json"], "json"))["caption"])
        except (ValueError, KeyError, TypeError):
            raise BadSample(f"sample {sample['__key__']} has no txt and no json caption") from None
    else:
        raise BadSample(f"sample {sample['__key__']} has no caption (txt)")
    if not caption:
        raise BadSample(f"sample {sample['__key__']} has an empty caption")
    return image, caption


def doc_fields(sample: dict, max_images: int) -> tuple[list[bytes], str]:
    """(image bytes in order, text with ``<image>``/``<|endofchunk|>`` markers) of a document."""
    if "__error__" in sample:
        raise BadSample(sample["__error__"])
    if "json" not in sample:
        raise BadSample(f"document {sample['__key__']} has no json")
    try:
        doc = json.loads(_text(sample["json"], "json"))
        texts = [str(t) for t in doc["text_list"]]
        infos = sorted(doc["image_info"], key=lambda d: int(d["matched_text_index"]))
        by_sentence = {int(d["matched_text_index"]): str(d["image_name"]) for d in infos}
    except (ValueError, KeyError, TypeError) as e:
        raise BadSample(f"document {sample['__key__']} json is malformed: {e}") from None
    images, parts = [], []
    for i, sentence in enumerate(texts):
        name = by_sentence.get(i)
        if name is not None and len(images) < max_images:
            ext = name.lower()
            if ext not in sample:
                raise BadSample(f"document {sample['__key__']} references missing image {name!r}")
            if images:
                parts.append(EOC)
            parts.append(MEDIA)
            images.append(sample[ext])
        parts.append(sentence)
    if not images:
        raise BadSample(f"document {sample['__key__']} has no image")
    parts.append(EOC)
    return images, " ".join(parts)


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


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite batches of one dataset for one rank; split over DataLoader workers.

    Each batch is a dict of stacked tensors plus ``_worker`` (logical worker id), ``_pos``
    (samples that worker has taken from its shuffle buffer so far) and ``_skipped`` (bad samples
    it skipped so far). ``start`` = ``{"pos": [...], "skipped": [...], "batches": n}`` resumes.
    """

    def __init__(self, shards: list[str], encoder: Encoder, batch_size: int, *, seed: int, rank: int,
                 world_size: int, num_workers: int, shuffle_buffer: int, resampled: bool, start: dict | None = None):
        super().__init__()
        self.shards, self.encoder, self.batch_size = shards, encoder, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.resampled = max(1, num_workers), shuffle_buffer, resampled
        self.start = start or {"pos": [0] * self.num_workers, "skipped": [0] * self.num_workers, "batches": 0}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        # The DataLoader always asks worker 0 first: rotate so the logical worker that is due comes first.
        worker = (physical + self.start["batches"]) % self.num_workers
        reader = self.rank * self.num_workers + worker
        readers = self.world_size * self.num_workers
        raw = raw_stream(self.shards, self.seed, reader, readers, self.resampled)
        stream = shuffled(raw, self.shuffle_buffer, random.Random(f"{self.seed}-shuffle-{reader}"))
        pos, skipped = self.start["pos"][worker], self.start["skipped"][worker]
        for _ in range(pos):
            next(stream)
        examples = []
        for sample in stream:
            pos += 1
            try:
                examples.append(self.encoder(sample))
            except BadSample:
                skipped += 1
                continue
            if len(examples) == self.batch_size:
                batch = collate(examples)
                batch.update(_worker=torch.tensor(worker), _pos=torch.tensor(pos), _skipped=torch.tensor(skipped))
                yield batch
                examples = []


class DataStream:
    """One dataset's DataLoader for this rank, with its resumable position (:meth:`state_dict`)."""

    def __init__(self, name: str, dataset: ShardStream, num_workers: int, weight: float = 1.0):
        self.name, self.dataset, self.weight = name, dataset, weight
        self.num_workers = num_workers
        self.state = {k: (list(v) if isinstance(v, list) else v) for k, v in dataset.start.items()}
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
        worker = int(batch.pop("_worker"))
        self.state["pos"][worker] = int(batch.pop("_pos"))
        self.state["skipped"][worker] = int(batch.pop("_skipped"))
        self.state["batches"] += 1
        return batch

    @property
    def skipped(self) -> int:
        return sum(self.state["skipped"])

    def state_dict(self) -> dict:
        return {"pos": list(self.state["pos"]), "skipped": list(self.state["skipped"]),
                "batches": self.state["batches"]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["pos"]) != len(self.state["pos"]):
            raise ValueError(f"dataset {self.name!r}: checkpoint has {len(state['pos'])} data workers, "
                             f"this run {len(self.state['pos'])}; resume with the same data.num_workers")
        self.state = {"pos": list(state["pos"]), "skipped": list(state["skipped"]), "batches": state["batches"]}
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
