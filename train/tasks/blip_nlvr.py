"""BLIP NLVR2 fine-tuning (salesforce ``train_nlvr.py``): :class:`vlmcore.blip.BlipNLVR` on ``kind: nlvr``
shards (``train/data/vqa_nlvr.py``): two images, one sentence, cross-entropy on true / false.

Training swaps the two images of half the samples (drawn per sample and visit from the key), and
then "left" <-> "right" in their sentence, as salesforce's ``nlvr_dataset`` does; evaluation keeps
the order. Eval: ``nlvr_acc``, the accuracy over the held-out pairs. Config section ``model.blip_nlvr``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from vlmcore.train.config import NonNegativeInt
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.pipeline import DEFAULT_MAX_IMAGE_PIXELS, decode_image, eval_batches
from vlmcore.train.data.vqa_nlvr import NLVR_KIND, nlvr_fields
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.blip_common import BlipTextSection, check_init, freeze_init_vision
from vlmcore.train.tasks.common import build_vision, move

from vlmcore.blip import BlipNLVR
from vlmcore.blip.build import checkpoint_format, nlvr_from_checkpoint
from vlmcore.blip.nlvr import MERGE_FROM_LAYER


@dataclass
class BlipNlvrConfig:
    """``model.blip_nlvr``."""

    text: BlipTextSection = field(default_factory=BlipTextSection)
    merge_from_layer: NonNegativeInt = MERGE_FROM_LAYER  # first layer merging the two images with merge_layer
    init: str = ""  # a salesforce BLIP_NLVR .pth or a pre-trained BLIP (.pth, or a blip_pretrain out_dir)

    def check(self, where: str) -> list[str]:
        if self.init and checkpoint_format(self.init) not in ("save_blip", "salesforce"):
            return [f"{where}.init: {self.init!r} is neither a BLIP checkpoint folder (blip.json) nor a "
                    "salesforce/BLIP .pth file"]
        return []


def swap_sides(sentence: str) -> str:
    """``sentence`` with the words "left" and "right" exchanged (the images are swapped)."""
    return " ".join({"left": "right", "right": "left"}.get(w, w) for w in sentence.split(" "))


class NlvrEncoder:
    """``nlvr`` sample -> ``{"images0", "images1" [3, H, W], "input_ids", "attention_mask" [T], "labels" []}``."""

    def __init__(self, text: BlipText, image_size: int, train: bool, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.text, self.image_size, self.train, self.max_pixels = text, image_size, train, max_pixels
        self.visits: dict[str, int] = {}

    def __call__(self, sample: dict) -> dict:
        left, right, sentence, label = nlvr_fields(sample)
        if self.train:
            key = sample["__key__"]
            visit = self.visits.get(key, 0)
            self.visits[key] = visit + 1
            if random.Random(f"{key}:{visit}").random() < 0.5:
                left, right, sentence = right, left, swap_sides(sentence)
        ids, mask = self.text.encode([sentence])
        return {"images0": decode_image(left, self.image_size, max_pixels=self.max_pixels),
                "images1": decode_image(right, self.image_size, max_pixels=self.max_pixels),
                "input_ids": ids[0], "attention_mask": mask[0], "labels": torch.tensor(label, dtype=torch.long)}


class BlipNlvrTask(Task):
    name = "blip_nlvr"
    Config = BlipNlvrConfig
    data_kinds = (NLVR_KIND,)
    media_tokens = False

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        out = []
        if cfg.model.lm is not None:
            out.append(f"model.lm: task {cls.name!r} has its own text transformer; remove model.lm")
        if cfg.model.gradient_checkpointing:
            out.append(f"model.gradient_checkpointing: not available for task {cls.name!r}")
        return out

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.text = BlipText(tokenizer)

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        if self.config.init:
            model = nlvr_from_checkpoint(self.config.init, image_size=self.cfg.model.vision.image_size,
                                         merge_from_layer=self.config.merge_from_layer,
                                         text_overrides=self.text.special_ids(),
                                         source=f"model.blip_nlvr.init {self.config.init}")
            check_init(model, self.text.vocab_size, self.cfg.model.vision.image_size, "model.blip_nlvr.init")
            freeze_init_vision(model, self.cfg.model.vision, "model.blip_nlvr.init")
            return model
        config = self.text.med_config(max_position_embeddings=max(64, self.text.context_length),
                                      encoder_width=self.cfg.model.vision.width, **asdict(self.config.text))
        return BlipNLVR(build_vision(self.cfg), config, merge_from_layer=self.config.merge_from_layer)

    def encoder(self, kind: str, max_images: int) -> NlvrEncoder:
        return NlvrEncoder(self.text, self.cfg.model.vision.image_size, True, self.cfg.data.max_image_pixels)

    def eval_encoder(self) -> NlvrEncoder:
        return NlvrEncoder(self.text, self.cfg.model.vision.image_size, False, self.cfg.data.max_image_pixels)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        batch = move(batch, device)
        logits = model(batch["images0"], batch["images1"], batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().detach()
        return loss, {"accuracy": accuracy}

    def batch_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        device, hits, total = ctx.info.device, 0, 0
        for batch, _ in eval_batches(ctx.shards, ctx.encoder, ctx.eval.batch_size, 0, 1, ctx.eval.max_batches):
            batch = move(batch, device)
            logits = module(batch["images0"].to(ctx.dtype), batch["images1"].to(ctx.dtype), batch["input_ids"],
                            batch["attention_mask"])
            hits += int((logits.argmax(-1) == batch["labels"]).sum())
            total += int(batch["labels"].shape[0])
        return {"eval_samples": total, "nlvr_acc": hits / max(total, 1)}
