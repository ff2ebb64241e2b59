"""What the three BLIP tasks share: the ``model.<task>`` section, the model, the sample encoder,
the evaluations, the export. Each task (``blip_pretrain``, ``blip_retrieval``, ``blip_caption``)
is a small subclass of :class:`BlipTaskBase` in its own file.

- Model: :class:`vlmcore.BLIP` over the ``model.vision`` ViT (``common.build_vision``) with the
  text transformer of the section; or, with ``init``, the checkpoint's own model. ``init`` is told
  apart by what it holds (:func:`vlmcore.blip.build.checkpoint_format`): a folder with ``blip.json``
  (:func:`vlmcore.blip.save_blip`, e.g. the out_dir of a ``blip_pretrain`` run), a folder with
  ``config.json`` (a transformers ``save_pretrained`` ``BlipForImageTextRetrieval`` /
  ``BlipForConditionalGeneration``, the ones the task's ``hf_exports`` name), a salesforce/BLIP
  ``.pth``. Missing / unexpected keys are refused in one report (``check_keys``).
- Text: ``[CLS] caption <eos>`` (``train/blip_text.py``); the caption task prefixes the prompt.
  A ``KEY.txt`` with several lines (CapFilt output: kept web + synthetic captions) gives one line
  per visit, drawn from a generator seeded by the key and the visit count.
- ``alpha`` ramps linearly over ``alpha_ramp_steps`` (BLIP: the first epoch); the step count is a
  model buffer, so it is checkpointed and resumes with the run (one device->host read per step).
- Export: ``model.safetensors`` + ``blip.json`` in ``out_dir``: the run's folder is a BLIP
  checkpoint (:func:`vlmcore.blip.load_blip`, ``vlmcore-capfilt --captioner/--filter``).
  ``vlmcore-export --to FORMAT`` (``hf_exports``): a transformers ``save_pretrained`` directory,
  for a model whose ViT is BLIP's (``init`` from Hugging Face or salesforce).
- Evaluation (every rank evaluates the same first ``max_batches`` batches of the held-out set, so
  the numbers are identical on all ranks): retrieval Recall@1/5/10 with ITC top-``k_test``
  re-ranked by ITM, and caption token accuracy with and without the images.

ZeRO-3 is refused: the momentum update reads the online parameters in place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Annotated, ClassVar

import torch
from torch import nn
from vlmcore.train.config import Bounds, NonNegativeInt, PositiveInt, Rate, Unit
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.pipeline import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IGNORE_INDEX,
    BadSample,
    decode_image,
    eval_batches,
    pair_fields,
)
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.common import build_vision, move

from vlmcore.blip import (
    BLIP,
    blip_from_salesforce,
    blip_retrieval_metrics,
    build_blip,
    load_blip,
)
from vlmcore.blip.build import blip_from_hf, checkpoint_format
from vlmcore.blip.convert import save_hf_blip

#: The initial ITC temperature's range (the learnable temperature is clamped to it).
Temperature = Annotated[float, Bounds(ge=0.001, le=0.5)]


@dataclass
class BlipTextSection:
    """The MED text transformer (BERT-base in BLIP: 768 / 12 / 12 / 3072)."""

    hidden_size: PositiveInt = 64  # BLIP: 768
    num_hidden_layers: PositiveInt = 2  # BLIP: 12
    num_attention_heads: PositiveInt = 4  # BLIP: 12
    intermediate_size: PositiveInt = 128  # feed-forward width (BLIP: 3072)

    def check(self, where: str) -> list[str]:
        if self.num_attention_heads >= 1 and self.hidden_size % self.num_attention_heads:
            return [f"{where}.hidden_size: {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}"]
        return []


@dataclass
class BlipConfig:
    """``model.blip_pretrain`` / ``model.blip_retrieval`` / ``model.blip_caption``."""

    embed_dim: PositiveInt = 256  # ITC projection width
    text: BlipTextSection = field(default_factory=BlipTextSection)
    momentum: Rate = 0.995  # EMA factor of the momentum encoders
    queue_size: NonNegativeInt = 57600  # momentum features kept per modality (all ranks enqueue)
    alpha: Unit = 0.4  # weight of the momentum-distilled soft targets
    alpha_ramp_steps: NonNegativeInt = 0  # 0: alpha from the first step
    temperature: Temperature = 0.07  # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    prompt: str = "a picture of "  # blip_caption: prefixed to every caption, excluded from the loss
    k_test: PositiveInt = 256  # retrieval eval: ITC candidates re-ranked by ITM per query
    init: str = ""  # a save_blip folder (blip.json), an HF save_pretrained folder (config.json) or a salesforce .pth

    def check(self, where: str) -> list[str]:
        """``init`` is a checkpoint (the ``text`` section is checked on its own, by the config walker)."""
        if self.init and checkpoint_format(self.init) is None:
            return [f"{where}.init: {self.init!r} is neither a BLIP checkpoint folder (blip.json), a Hugging Face "
                    "save_pretrained folder (config.json) nor a salesforce/BLIP .pth file"]
        return []


def check_init(model: nn.Module, vocab_size: int, image_size: int, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless the model read from ``init`` fits the run: the
    tokenizer's ``vocab_size`` and ``model.vision.image_size`` (a salesforce ``.pth`` is resized to it)."""
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"{where}: checkpoint vocab_size {model.config.vocab_size} != {vocab_size} of the tokenizer "
                         "(BLIP's layout: train/data/blip_text.py)")
    tower = model.visual_encoder
    size = tower.model.config.image_size if hasattr(tower, "model") else tower.image_size
    if size != image_size:
        raise ValueError(f"model.vision.image_size: {image_size}, but {where} was trained at {size} px; set it to "
                         f"{size}")


def freeze_init_vision(model: nn.Module, vision, where: str) -> None:
    """``model.vision.freeze`` (``vision``) on the ViT that ``where`` (an init checkpoint) brought, as on a tower
    model.vision builds: no ``visual_encoder`` parameter trains. ``unlocked_layers`` counts the blocks of
    model.vision's tower types, not of the checkpoint's ViT: refused naming both keys."""
    if not vision.freeze:
        return
    if vision.unlocked_layers:
        raise ValueError(f"model.vision.unlocked_layers: {vision.unlocked_layers}, but the ViT comes from {where}, "
                         "not from model.vision: only a whole-tower freeze applies to it (unlocked_layers: 0)")
    model.visual_encoder.requires_grad_(False)


def _image_id(sample: dict, image: bytes) -> int:
    """The sample's ``image_id`` from its JSON, else a hash of the image bytes (same image, same id;
    56 bits, so never negative). A negative JSON id is a :class:`BadSample`: the model's
    ``idx_queue`` marks empty slots with -100."""
    value = None
    if "json" in sample:
        try:
            value = json.loads(sample["json"].decode("utf-8")).get("image_id")
        except (UnicodeDecodeError, ValueError, AttributeError):
            value = None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise BadSample(f"sample {sample['__key__']} has image_id {value}: image ids must be >= 0 "
                            "(negative ids are reserved for empty queue slots)", "json_error")
        return value
    return int.from_bytes(hashlib.sha1(image).digest()[:7], "little")


class BlipEncoder:
    """Pair sample -> ``{"images" [3, H, W], "input_ids" [T], "attention_mask" [T], "image_ids" []}``;
    images above ``max_pixels`` are skipped undecoded."""

    def __init__(self, text: BlipText, image_size: int, prompt: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.text, self.image_size, self.prompt, self.max_pixels = text, image_size, prompt, max_pixels
        self.visits: dict[str, int] = {}

    def __call__(self, sample: dict) -> dict:
        image, caption = pair_fields(sample)
        lines = [line.strip() for line in caption.split("\n") if line.strip()]
        if not lines:
            raise BadSample(f"sample {sample['__key__']} has an empty caption")
        key = sample["__key__"]
        visit = self.visits.get(key, 0)
        self.visits[key] = visit + 1
        line = lines[0] if len(lines) == 1 else random.Random(f"{key}:{visit}").choice(lines)
        ids, mask = self.text.encode([self.prompt + line])
        return {"images": decode_image(image, self.image_size, max_pixels=self.max_pixels), "input_ids": ids[0],
                "attention_mask": mask[0], "image_ids": torch.tensor(_image_id(sample, image), dtype=torch.long)}


class BlipTaskBase(Task):
    """The BLIP tasks' shared behaviour; a subclass sets ``name``, ``losses``, ``all_rank_negatives``,
    ``use_prompt``, ``with_momentum`` and ``eval_kinds``."""

    Config = BlipConfig
    data_kinds = ("pairs",)
    media_tokens = False  # captions hold no image placeholders: a BERT vocabulary stays BLIP's
    losses: tuple[str, ...] = ("itc", "itm", "lm")
    all_rank_negatives = False
    use_prompt = False
    with_momentum = True
    eval_kinds: tuple[str, ...] = ("retrieval", "caption")
    #: vlmcore-export format -> the transformers architecture it writes; ``init`` reads the same ones.
    hf_exports: ClassVar[dict[str, str]] = {}

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        out = []
        if cfg.model.gradient_checkpointing:
            out.append(f"model.gradient_checkpointing: not available for task {cls.name!r}")
        if cfg.model.lm is not None:
            out.append(f"model.lm: task {cls.name!r} has its own text transformer; remove model.lm")
        if (cfg.deepspeed.get("zero_optimization", {}) or {}).get("stage", 0) == 3:
            out.append(f"deepspeed.zero_optimization.stage: task {cls.name!r} supports ZeRO 0-2 (the momentum "
                       "encoders read the online parameters in place)")
        return out

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.text = BlipText(tokenizer)
        self.prompt = self.config.prompt if self.use_prompt else ""
        self.prompt_length = 1 + len(self.text.prompt_ids(self.prompt)) if self.prompt else 0

    def spec(self) -> dict:
        c, v = self.config, self.cfg.model.vision
        return {"vision": {"kind": "vit", "image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                           "depth": v.depth, "heads": v.heads, "mlp_ratio": v.mlp_ratio},
                "text": asdict(self.text.med_config(max_position_embeddings=max(64, self.text.context_length),
                                                    encoder_width=v.width, **asdict(c.text))),
                "embed_dim": c.embed_dim, "momentum": c.momentum if self.with_momentum else None,
                "queue_size": c.queue_size, "temperature": c.temperature}

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        spec = self.spec()
        where = f"model.{self.name}.init"
        fmt = checkpoint_format(self.config.init) if self.config.init else None
        if fmt == "salesforce":
            model = blip_from_salesforce(self.config.init, image_size=self.cfg.model.vision.image_size,
                                         momentum=spec["momentum"], text_overrides=self.text.special_ids())
            if model.momentum is not None and model.image_queue.shape[0] != self.config.queue_size:
                raise ValueError(f"model.{self.name}.queue_size: {self.config.queue_size}, but {where} "
                                 f"{self.config.init!r} holds a queue of {model.image_queue.shape[0]}; set it to that")
            model.train()
        elif fmt is not None:
            if fmt == "hf":
                model = blip_from_hf(self.config.init, source=f"{where} {self.config.init}",
                                     accept=tuple(self.hf_exports.values()), text_overrides=self.text.special_ids(),
                                     momentum=spec["momentum"], queue_size=spec["queue_size"],
                                     temperature=spec["temperature"])
            else:
                model = load_blip(self.config.init, momentum=spec["momentum"], queue_size=spec["queue_size"])
            size = model.spec["vision"].get("image_size")
            if size != self.cfg.model.vision.image_size:
                raise ValueError(f"model.vision.image_size: {self.cfg.model.vision.image_size}, but {where} "
                                 f"{self.config.init!r} was trained at {size} px; set it to {size}")
        if self.config.init:
            if model.config.vocab_size != self.text.vocab_size:
                raise ValueError(f"{where}: checkpoint vocab_size {model.config.vocab_size} != "
                                 f"{self.text.vocab_size} of tokenizer {self.cfg.tokenizer.path!r} (BLIP's layout: "
                                 "train/blip_text.py)")
            freeze_init_vision(model, self.cfg.model.vision, where)
        else:
            model = build_blip(spec)
            vision = build_vision(self.cfg)  # honours model.vision.init / freeze / unlocked_layers
            model.visual_encoder.load_state_dict(vision.state_dict())
            frozen = {name for name, p in vision.named_parameters() if not p.requires_grad}
            for name, p in model.visual_encoder.named_parameters():
                p.requires_grad_(name not in frozen)
            if model.momentum is not None:
                model.copy_params_to_momentum()
        model.register_buffer("train_step", torch.zeros(1, dtype=torch.long))
        return model

    def peer_exporters(self) -> dict:
        return {fmt: functools.partial(self._write_hf, architecture=arch) for fmt, arch in self.hf_exports.items()}

    def _write_hf(self, module: nn.Module, out_dir: str, architecture: str) -> None:
        """A transformers ``architecture`` ``save_pretrained`` directory (:func:`save_hf_blip`)."""
        if module.spec["vision"].get("kind") != "hf_blip":
            raise ValueError(f"model.{self.name}.init: this run's ViT is vlmcore's (model.vision: ln_pre, no patch "
                             f"bias), not BLIP's; {architecture} holds BLIP's ViT: start the run from a Hugging "
                             "Face or salesforce BLIP (init) to export it")
        save_hf_blip(module, out_dir, architecture)

    def encoder(self, kind: str, max_images: int) -> BlipEncoder:
        return BlipEncoder(self.text, self.cfg.model.vision.image_size, self.prompt, self.cfg.data.max_image_pixels)

    def _alpha(self, module: BLIP) -> float:
        ramp = self.config.alpha_ramp_steps
        if ramp == 0:
            return self.config.alpha
        step = int(module.train_step)  # one device->host read per step
        return self.config.alpha * min(1.0, step / ramp)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        module = getattr(model, "module", model)
        batch = move(batch, device)
        alpha = self._alpha(module)
        with torch.no_grad():
            module.train_step += 1
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], alpha=alpha, losses=self.losses,
                    prompt_length=self.prompt_length, image_ids=batch["image_ids"],
                    group=group, all_rank_negatives=self.all_rank_negatives and group is not None)
        metrics = {k: out[k].detach().float().reshape(()) for k in ("itc", "itm", "lm", "itm_acc") if k in out}
        if "itc" in out:
            metrics["temperature"] = module.temp.detach().float().reshape(())
            metrics["alpha"] = alpha
        return out["loss"].float(), metrics

    def batch_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        device, dtype = ctx.info.device, ctx.dtype
        images, ids, masks, image_ids = [], [], [], []
        for batch, _ in eval_batches(ctx.shards, ctx.encoder, ctx.eval.batch_size, 0, 1, ctx.eval.max_batches):
            images.append(batch["images"])
            ids.append(batch["input_ids"])
            masks.append(batch["attention_mask"])
            image_ids.append(batch["image_ids"])
        if not images:  # no usable sample: run_evaluation's counts raise the EvalDataError that says why
            return {"eval_samples": 0}
        images = torch.cat(images).to(device, dtype)
        ids, masks, image_ids = (torch.cat(t).to(device) for t in (ids, masks, image_ids))
        results: dict = {"eval_samples": int(ids.shape[0])}
        if "retrieval" in self.eval_kinds:
            # one entry per distinct image; each caption points at its image
            unique, text_to_image = torch.unique(image_ids, sorted=False, return_inverse=True)
            first = torch.full((len(unique),), ids.shape[0], device=device, dtype=torch.long).scatter_reduce(
                0, text_to_image, torch.arange(ids.shape[0], device=device), "amin")
            score_i2t, score_t2i = module.retrieval_scores(images[first], ids, masks, k_test=self.config.k_test,
                                                           batch_size=ctx.eval.batch_size)
            results.update(blip_retrieval_metrics(score_i2t, score_t2i, text_to_image))
        if "caption" in self.eval_kinds:
            results.update(self._caption_accuracy(module, images, ids, masks))
        return results

    def _caption_accuracy(self, module: BLIP, images, ids, masks) -> dict:
        """Next-token accuracy of the decoder on the held-out captions, with images and blanked."""
        bos = module.config.bos_token_id
        decoder_ids = ids.clone()
        decoder_ids[:, 0] = bos
        targets = decoder_ids[:, 1:].masked_fill(masks[:, 1:] == 0, IGNORE_INDEX)
        if self.prompt_length:
            targets[:, : self.prompt_length - 1] = IGNORE_INDEX
        valid = targets != IGNORE_INDEX
        out = {"eval_tokens": int(valid.sum())}
        for name, pixels in (("caption_token_acc", images), ("blind_token_acc", torch.zeros_like(images))):
            logits = module.decoder_logits(module.encode_image(pixels), decoder_ids, masks)
            hits = (logits[:, :-1].argmax(-1) == targets) & valid
            out[name] = float(hits.sum()) / max(int(valid.sum()), 1)
        return out

    def export(self, module: nn.Module) -> dict[str, tuple[list[str], str]]:
        """``model.safetensors`` (online weights) + ``blip.json``: ``out_dir`` becomes a BLIP checkpoint."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(self.cfg.out_dir, exist_ok=True)
            path = os.path.join(self.cfg.out_dir, "blip.json")
            # the model's own spec: an init checkpoint (e.g. salesforce's ViT) may differ from model.vision
            spec = dict(getattr(module, "spec", None) or self.spec())
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                json.dump(spec, handle, indent=1, sort_keys=True)
            os.replace(path + ".tmp", path)
        momentum = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
        return {"model.safetensors": ([n for n, _ in module.named_parameters() if not n.startswith(momentum)], "")}

    def load_exported(self, run_dir: str) -> BLIP:
        """``run_dir`` is a BLIP checkpoint (:meth:`export`): its own spec and weights, without the
        momentum encoders. ``init`` is not read again: it may be gone, and a salesforce one is large."""
        return load_blip(run_dir, momentum=None)
