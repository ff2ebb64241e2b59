"""CapFilt (BLIP, Li et al. 2022): caption web images with a captioner, filter web and synthetic
captions with an ITM filter, write bootstrapped WebDataset shards.

BLIP's authors released the resulting caption files, not this program; this is our implementation
of the procedure in the paper (section 3.3).

Input: shards as img2dataset writes them (``KEY.jpg|png|...``, ``KEY.txt``, optional ``KEY.json``).
For every image:

1. the captioner (a BLIP fine-tuned with the LM loss) writes ``--num-captions`` synthetic captions,
   nucleus sampling with ``--top-p`` (0.9; ``--sampling beam`` for beam search), prompted with
   ``--prompt`` ("a picture of ", stripped from the output as BLIP does);
2. the filter (a BLIP fine-tuned with ITC + ITM) scores the web caption and every synthetic one;
   a caption is kept when its ITM match probability is >= ``--threshold`` (0.5).

Output, in ``--output`` (never the input's folder), one shard per input shard, same name:
``KEY.<image ext>`` (the original bytes), ``KEY.txt`` (the kept captions, one per line; an image
with none kept is not written), ``KEY.json`` (every caption with its source ``web`` /
``synthetic``, ITM score and kept flag, the input's own JSON, its ``image_id`` at the top level
when it has one, and both checkpoints). Plus
``capfilt_report.json``: images, web captions kept / dropped, synthetic kept / dropped, images with
no caption left, corrupt samples skipped, per shard and in total (BLIP's noise ratios). Corrupt
samples include images above ``--max-image-pixels`` (refused from their header, never decoded) and
samples whose member names have a ``..`` component or a leading ``/`` (never copied: extracting the
output would write outside the target folder). ``vlmcore-capfilt`` names missing inputs and exits
with status 2, no traceback (:class:`InputError`).

Runs under ``torchrun`` / ``deepspeed`` (shards split by rank: ``shards[rank::world]``), batches on
the GPU when there is one, writes each shard to a temporary file renamed when complete, and on
restart skips every shard whose output and per-shard statistics exist; the statistics record the
settings and the checkpoints' SHA-256 (:func:`provenance`), and a finished shard made with other
ones is refused (``--redo-mismatched``: redone), never summed into one report. Sampling is seeded per
shard (``--seed`` and the shard's name), so a resumed run writes the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field

import torch
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.pipeline import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTS,
    BadSample,
    decode_image,
    expand_shards,
    pair_fields,
    read_tar,
)
from vlmcore.train.data.tar_writer import TarWriter
from vlmcore.train.data.tokenizer import Tokenizer

from vlmcore.blip import BLIP, blip_from_salesforce, is_salesforce_checkpoint, load_blip

REPORT_NAME = "capfilt_report.json"
STATS_SUFFIX = ".capfilt.json"


class InputError(ValueError):
    """The ``--input`` shards are missing (or the spec is malformed): a usage error, exit status 2."""


@dataclass
class CapFiltSettings:
    """What :func:`run_capfilt` does; the CLI flags map one to one (see ``--help``)."""

    input: list[str]
    output: str
    captioner: str
    filter: str
    tokenizer: str
    num_captions: int = 1
    sampling: str = "nucleus"
    top_p: float = 0.9
    num_beams: int = 3
    max_length: int = 30
    min_length: int = 5
    repetition_penalty: float = 1.0
    prompt: str = "a picture of "
    threshold: float = 0.5
    batch_size: int = 32
    image_size: int | None = None
    context_length: int = 32
    seed: int = 0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are corrupt samples, skipped undecoded
    progress: bool = True
    redo_mismatched: bool = False  # redo finished shards made with other settings (else: refuse them)

    def __post_init__(self):
        if self.sampling not in ("nucleus", "beam"):
            raise ValueError(f"sampling must be 'nucleus' or 'beam', got {self.sampling!r}")
        for name in ("num_captions", "batch_size", "max_length", "num_beams", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class ShardStats:
    """Counts of one shard (summed into ``capfilt_report.json``)."""
    images: int = 0
    web_kept: int = 0
    web_dropped: int = 0
    synthetic_kept: int = 0
    synthetic_dropped: int = 0
    images_without_caption: int = 0
    corrupt_skipped: int = 0
    corrupt_examples: list[str] = field(default_factory=list)


def _checkpoint_id(path: str) -> dict:
    """Path and SHA-256 of a checkpoint's weights (recorded in every output JSON): a save_blip folder's
    ``model.safetensors``, or the salesforce ``.pth`` file itself."""
    digest = hashlib.sha256()
    with open(path if os.path.isfile(path) else os.path.join(path, "model.safetensors"), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": os.path.abspath(path), "sha256": digest.hexdigest()}


def _shard_seed(seed: int, shard: str) -> int:
    """The sampling seed of one shard: from ``--seed`` and the shard's file name only (resume-safe)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{os.path.basename(shard)}".encode()).digest()[:8], "little") >> 1


def _unsafe_name(key: str) -> str | None:
    """Why a sample's member names must not be copied into the output (None when they are safe): a
    ``..`` component or a leading ``/`` makes Python's ``extractall`` (and old tar tools) write
    outside the target folder."""
    if key.startswith("/"):
        return "a member name starts with '/'"
    if ".." in key.split("/"):
        return "a member name has a '..' component"
    return None


def _image_ext(sample: dict) -> str:
    """The sample's image member (the first of ``IMAGE_EXTS`` it has)."""
    return next(e for e in IMAGE_EXTS if e in sample)


class CapFilt:
    """The captioner + filter pair on one device; :meth:`process_shard` does one shard."""

    def __init__(self, settings: CapFiltSettings, device: torch.device):
        self.settings = settings
        self.device = device
        self.text = BlipText(Tokenizer(settings.tokenizer, settings.context_length, media_tokens=False),
                             settings.context_length)
        self.captioner: BLIP = self._load(settings.captioner, settings.image_size).to(device).eval()
        self.filter: BLIP = self._load(settings.filter, settings.image_size).to(device).eval()
        for name, model in (("captioner", self.captioner), ("filter", self.filter)):
            if model.config.vocab_size != self.text.vocab_size:
                raise ValueError(f"{name} checkpoint has vocab_size {model.config.vocab_size}, but tokenizer "
                                 f"{settings.tokenizer!r} + BLIP's special ids give {self.text.vocab_size}")
        spec_vision = self.filter.spec["vision"]
        self.image_size = settings.image_size or int(spec_vision.get("image_size", 224))
        self.provenance = {"captioner": _checkpoint_id(settings.captioner), "filter": _checkpoint_id(settings.filter),
                           "threshold": settings.threshold, "sampling": settings.sampling,
                           "top_p": settings.top_p if settings.sampling == "nucleus" else None,
                           "prompt": settings.prompt}
        self.prompt_ids = self.text.prompt_ids(settings.prompt)

    def _load(self, path: str, image_size: int | None) -> BLIP:
        """A save_blip folder, or an original salesforce/BLIP ``.pth`` (its ids: train/blip_text.py's BERT
        layout, so ``--tokenizer`` must be BLIP's bert-base-uncased directory)."""
        if is_salesforce_checkpoint(path):
            return blip_from_salesforce(path, image_size=image_size, momentum=None,
                                        text_overrides=self.text.special_ids())
        return load_blip(path, momentum=None)

    @torch.no_grad()
    def _captions(self, images: torch.Tensor) -> list[list[str]]:
        """``num_captions`` synthetic captions per image of ``images [B, 3, S, S]``."""
        s = self.settings
        kwargs = dict(do_sample=True, top_p=s.top_p) if s.sampling == "nucleus" else dict(num_beams=s.num_beams)
        # KV-cached decoding: each step runs the new token only, the image keys / values are projected once
        ids = self.captioner.generate(images, prompt_ids=self.prompt_ids, max_length=s.max_length,
                                      min_length=s.min_length, repetition_penalty=s.repetition_penalty,
                                      num_return_sequences=s.num_captions, use_cache=True, **kwargs)
        texts = [self.text.decode(row) for row in ids.cpu()]
        return [texts[i * s.num_captions:(i + 1) * s.num_captions] for i in range(images.shape[0])]

    @torch.no_grad()
    def _scores(self, images: torch.Tensor, captions: list[list[str]]) -> list[list[float]]:
        """ITM match probabilities, one list per image (same order as ``captions``)."""
        owner = [i for i, group in enumerate(captions) for _ in group]
        flat = [c for group in captions for c in group]
        ids, mask = self.text.encode(flat)
        probs = self.filter.itm_match_probability(images[owner], ids.to(self.device), mask.to(self.device))
        probs = probs.cpu().tolist()
        out, at = [], 0
        for group in captions:
            out.append(probs[at:at + len(group)])
            at += len(group)
        return out

    def _flush(self, batch: list[tuple[dict, torch.Tensor, str]], tar: TarWriter, stats: ShardStats) -> None:
        """Caption and filter one batch of ``(sample, image [3, S, S], web caption)``; write the images
        that keep a caption."""
        images = torch.stack([image for _, image, _ in batch]).to(self.device)
        synthetic = self._captions(images)
        candidates = [[web, *syn] for (_, _, web), syn in zip(batch, synthetic)]
        scores = self._scores(images, candidates)
        threshold = self.settings.threshold
        for (sample, _, _), texts, probs in zip(batch, candidates, scores):
            stats.images += 1
            records = []
            for j, (text, prob) in enumerate(zip(texts, probs)):
                source = "web" if j == 0 else "synthetic"
                kept = bool(prob >= threshold and text)
                stats_name = f"{source}_{'kept' if kept else 'dropped'}"
                setattr(stats, stats_name, getattr(stats, stats_name) + 1)
                records.append({"text": text, "source": source, "itm_score": round(float(prob), 6), "kept": kept})
            kept_texts = [r["text"] for r in records if r["kept"]]
            if not kept_texts:
                stats.images_without_caption += 1
                continue
            key = sample["__key__"]
            original = None
            if "json" in sample:
                try:
                    original = json.loads(sample["json"].decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    original = None
            meta = {"key": key, "captions": records, "capfilt": self.provenance, "source_json": original}
            if isinstance(original, dict) and "image_id" in original:
                meta["image_id"] = original["image_id"]  # the trainer's BLIP tasks read it at the top level
            ext = _image_ext(sample)
            tar.write_sample(key, {ext: sample[ext], "txt": "\n".join(kept_texts).encode("utf-8"),
                                   "json": json.dumps(meta, sort_keys=True).encode("utf-8")})

    def process_shard(self, shard: str, out_path: str, progress=None) -> ShardStats:
        """Bootstrap one shard into ``out_path`` (written as ``out_path + ".tmp"``, then renamed)."""
        torch.manual_seed(_shard_seed(self.settings.seed, shard))
        stats = ShardStats()
        batch: list[tuple[dict, torch.Tensor, str]] = []
        with TarWriter(out_path) as tar:
            for sample in read_tar(shard):
                try:
                    unsafe = _unsafe_name(sample["__key__"])
                    if unsafe:
                        raise BadSample(f"{unsafe}: never copied into the output")
                    image_bytes, caption = pair_fields(sample)
                    image = decode_image(image_bytes, self.image_size, max_pixels=self.settings.max_image_pixels)
                except BadSample as e:
                    stats.corrupt_skipped += 1
                    if len(stats.corrupt_examples) < 5:
                        # object addresses in PIL's messages would make reruns differ
                        stats.corrupt_examples.append(re.sub(r" at 0x[0-9a-f]+", "", f"{sample['__key__']}: {e}"))
                    continue
                batch.append((sample, image, caption))
                if len(batch) == self.settings.batch_size:
                    self._flush(batch, tar, stats)
                    if progress is not None:
                        progress.update(len(batch))
                    batch = []
            if batch:
                self._flush(batch, tar, stats)
                if progress is not None:
                    progress.update(len(batch))
        return stats


def _write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (``.tmp`` then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _dist_info() -> tuple[int, int]:
    """(rank, world size) from a ``torchrun`` / ``deepspeed`` launch environment, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _check_paths(shards: list[str], output: str) -> None:
    """ValueError when ``output`` is an input's folder or two inputs share a file name."""
    out = os.path.realpath(output)
    for shard in shards:
        if os.path.dirname(os.path.realpath(shard)) == out:
            raise ValueError(f"output {output!r} is the folder of input shard {shard!r}: CapFilt never writes "
                             "next to (or over) its input; choose another output folder")
    names = [os.path.basename(s) for s in shards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"input shards must have distinct file names (outputs keep them): {duplicates[:5]}")


def build_report(shards: list[str], output: str) -> dict:
    """Aggregate the per-shard statistics in ``output`` into ``capfilt_report.json`` (returned)."""
    per_shard = {}
    for shard in shards:
        name = os.path.basename(shard)
        with open(os.path.join(output, name + STATS_SUFFIX), encoding="utf-8") as handle:
            per_shard[name] = json.load(handle)["stats"]
    keys = ("images", "web_kept", "web_dropped", "synthetic_kept", "synthetic_dropped", "images_without_caption",
            "corrupt_skipped")
    total = {k: sum(s[k] for s in per_shard.values()) for k in keys}
    web = total["web_kept"] + total["web_dropped"]
    synthetic = total["synthetic_kept"] + total["synthetic_dropped"]
    total["web_noise_ratio"] = total["web_dropped"] / web if web else 0.0
    total["synthetic_noise_ratio"] = total["synthetic_dropped"] / synthetic if synthetic else 0.0
    report = {"total": total, "shards": per_shard}
    _write_json(os.path.join(output, REPORT_NAME), report)
    return report


def run_capfilt(settings: CapFiltSettings, *, device: torch.device | None = None) -> dict | None:
    """Run CapFilt on this process's shards; returns the report on the process that writes it
    (rank 0, after every rank finished), else None."""
    try:
        shards = expand_shards(settings.input)
    except ValueError as e:
        raise InputError(f"--input: {e}") from None
    _check_paths(shards, settings.output)
    os.makedirs(settings.output, exist_ok=True)
    rank, world = _dist_info()
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            else torch.device("cpu")
    mine = shards[rank::world]
    recorded = provenance(settings)
    if not settings.redo_mismatched:  # every rank refuses a mixed output folder, not only its own shards
        for shard in shards:
            _shard_done(shard, settings.output, recorded, redo=False)
    todo = [s for s in mine if not _shard_done(s, settings.output, recorded, settings.redo_mismatched)]
    if todo:
        worker = CapFilt(settings, device)
        progress = None
        if settings.progress:
            from tqdm import tqdm

            progress = tqdm(total=None, unit="img", desc=f"capfilt rank {rank}", file=sys.stderr, disable=rank != 0)
        for shard in todo:
            name = os.path.basename(shard)
            out_path = os.path.join(settings.output, name)
            stats = worker.process_shard(shard, out_path, progress)
            _write_json(out_path + STATS_SUFFIX, {"shard": os.path.abspath(shard), "stats": stats.__dict__,
                                                  "settings": recorded})
        if progress is not None:
            progress.close()
    if world > 1:
        _barrier(device)
    if rank == 0:
        return build_report(shards, settings.output)
    return None


def _barrier(device: torch.device) -> None:
    """Wait for every rank of the launch (joins the launcher's process group if needed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dist.barrier()


#: Settings that change no byte of the output (where it goes, how progress is shown, what to redo).
NEUTRAL_SETTINGS = ("input", "output", "progress", "redo_mismatched")


def _sha256(path: str) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
    for file in files:
        digest.update(os.path.relpath(file, path).encode("utf-8"))
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def provenance(settings: CapFiltSettings) -> dict:
    """What a shard's output is made with: every setting that changes it, the captioner's, filter's and
    tokenizer's SHA-256 instead of their paths (recorded per shard, compared on a rerun)."""
    recorded = {k: v for k, v in settings.__dict__.items() if k not in NEUTRAL_SETTINGS}
    for name in ("captioner", "filter", "tokenizer"):
        recorded[name] = {"path": recorded[name], "sha256": _sha256(recorded[name])}
    return recorded


def _differences(saved: dict | None, now: dict) -> list[str]:
    if saved is None:
        return ["it recorded no settings (an older CapFilt)"]
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):  # a checkpoint: its bytes decide, not its path
            a, b = a.get("sha256"), b.get("sha256")
        if a != b:
            out.append(f"{key}: {a!r} then, {b!r} now")
    return out


def _shard_done(shard: str, output: str, recorded: dict, redo: bool) -> bool:
    """Finished shards have their output tar and their statistics (written after the tar's rename).
    A finished shard made with other settings is refused (:class:`ValueError`) or, with ``redo``, redone."""
    name = os.path.basename(shard)
    stats_path = os.path.join(output, name + STATS_SUFFIX)
    if not (os.path.isfile(os.path.join(output, name)) and os.path.isfile(stats_path)):
        return False
    with open(stats_path, encoding="utf-8") as handle:
        differences = _differences(json.load(handle).get("settings"), recorded)
    if not differences or redo:
        return not differences
    raise ValueError(f"{os.path.join(output, name)} was made with other settings ({'; '.join(differences)}): "
                     "its statistics would be summed with this run's into one report. Rerun with the same settings, "
                     "choose another --output, or pass --redo-mismatched to redo such shards")


def parse_args(argv: list[str] | None = None) -> CapFiltSettings:
    """``vlmcore-capfilt``'s flags -> :class:`CapFiltSettings`."""
    p = argparse.ArgumentParser(prog="vlmcore-capfilt", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="input shards: paths, brace patterns or globs")
    p.add_argument("--output", required=True, help="output folder (not the input's)")
    p.add_argument("--captioner", required=True, help="BLIP checkpoint folder (vlmcore.blip.save_blip) or "
                   "salesforce/BLIP .pth, fine-tuned with the LM loss")
    p.add_argument("--filter", required=True, help="BLIP checkpoint folder or salesforce/BLIP .pth, fine-tuned "
                   "with ITC + ITM")
    p.add_argument("--tokenizer", required=True, help="tokenizer the checkpoints were trained with (JSON or HF dir)")
    p.add_argument("--num-captions", type=int, default=1, help="synthetic captions per image")
    p.add_argument("--sampling", choices=("nucleus", "beam"), default="nucleus", help="caption decoding")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--num-beams", type=int, default=3, help="beams for --sampling beam")
    p.add_argument("--max-length", type=int, default=30, help="caption length limit, prompt included")
    p.add_argument("--min-length", type=int, default=5, help="minimum caption length, prompt included")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="HF repetition penalty")
    p.add_argument("--prompt", default="a picture of ", help="captioner prompt (stripped from the output)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep a caption when ITM p(match) >= this")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--image-size", type=int, default=None, help="resize side (default: the filter's image size)")
    p.add_argument("--context-length", type=int, default=32, help="text tokens per caption for the filter")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per shard: seed + shard name)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="images with more pixels "
                   "are counted as corrupt and skipped without decoding them (the trainer's data.max_image_pixels)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--redo-mismatched", action="store_true", help="redo the finished shards of --output made with "
                   "other settings or checkpoints (without it they are refused)")
    args = p.parse_args(argv)
    return CapFiltSettings(
        input=args.input, output=args.output, captioner=args.captioner, filter=args.filter, tokenizer=args.tokenizer,
        num_captions=args.num_captions, sampling=args.sampling, top_p=args.top_p, num_beams=args.num_beams,
        max_length=args.max_length, min_length=args.min_length, repetition_penalty=args.repetition_penalty,
        prompt=args.prompt, threshold=args.threshold, batch_size=args.batch_size, image_size=args.image_size,
        context_length=args.context_length, seed=args.seed, max_image_pixels=args.max_image_pixels,
        progress=not args.no_progress,
        redo_mismatched=args.redo_mismatched)


def main(argv: list[str] | None = None) -> dict | None:
    """``vlmcore-capfilt`` in-process (tests call it with a list of arguments)."""
    return run_capfilt(parse_args(argv))


def console_main() -> None:
    """``vlmcore-capfilt``: run, then print the report's totals on the rank that writes it. Missing inputs
    are a usage error: the message and exit status 2, no traceback."""
    try:
        report = main()
    except InputError as e:
        print(f"vlmcore-capfilt: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if report is not None:
        print(json.dumps(report["total"], indent=1))


if __name__ == "__main__":
    console_main()
