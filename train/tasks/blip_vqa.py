"""BLIP VQA fine-tuning (salesforce ``train_vqa.py``): :class:`vlmcore.blip.BlipVQA` on ``kind: vqa``
shards (``train/data/vqa_nlvr.py``), the answers' LM loss weighted by the answers' weights.

- Text: the question ``[CLS] question [SEP]`` (the model swaps in ``[ENC]``), each answer
  ``[CLS] answer [SEP]`` in ``max_answer_tokens`` (the model swaps in ``[DEC]``). A sample keeps its
  ``max_answers`` heaviest answers, padded with weight-0 rows that the loss drops (on the host,
  before the batch moves: no device sync).
- Evaluation (``data.eval``, ``kind: vqa`` shards): ``inference: rank`` picks from ``answer_list``
  (a JSON list of answers, e.g. ``vlmcore-convert vqav2``'s ``answer_list.json``) the best of the
  ``k_test`` candidates of highest first-token probability; ``inference: generate`` decodes with
  ``num_beams`` beams. ``vqa_acc`` is VQA's official per-question accuracy
  (:func:`vlmcore.eval.vqa.question_accuracy`) against the raw answer list, or, for samples that
  give ``weights``, the predicted answer's weight (capped at 1).
Config section ``model.blip_vqa``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn
from vlmcore.train.config import PositiveInt
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.pipeline import DEFAULT_MAX_IMAGE_PIXELS, decode_image, eval_batches
from vlmcore.train.data.vqa_nlvr import VQA_KIND, answer_weights, vqa_fields
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.blip_common import BlipTextSection, check_init, freeze_init_vision
from vlmcore.train.tasks.common import build_vision, move

from vlmcore.blip import BlipVQA
from vlmcore.blip.build import checkpoint_format, vqa_from_checkpoint
from vlmcore.blip.convert import hf_blip_config, save_hf_blip
from vlmcore.blip.heads_convert import hf_vqa_name
from vlmcore.eval.vqa import normalize_answer, question_accuracy


@dataclass
class BlipVqaConfig:
    """``model.blip_vqa``."""

    text: BlipTextSection = field(default_factory=BlipTextSection)
    max_answers: PositiveInt = 10  # answers kept per question (the heaviest; VQAv2 has 10 annotators)
    max_answer_tokens: PositiveInt = 8  # [CLS] answer [SEP], truncated
    inference: Literal["rank", "generate"] = "rank"  # eval: rank answer_list, or generate
    answer_list: str = ""  # rank: a JSON list of candidate answers (vlmcore-convert vqav2's answer_list.json)
    k_test: PositiveInt = 128  # rank: candidates decoded whole per question (BLIP: 128)
    num_beams: PositiveInt = 3  # generate: beam width (BLIP: 3)
    init: str = ""  # HF BlipForQuestionAnswering folder, salesforce BLIP_VQA .pth, or a pre-trained BLIP

    def check(self, where: str) -> list[str]:
        if self.inference == "rank" and self.answer_list and not os.path.isfile(self.answer_list):
            return [f"{where}.answer_list: {self.answer_list!r} does not exist"]
        if self.init and checkpoint_format(self.init) is None:
            return [f"{where}.init: {self.init!r} is neither a BLIP checkpoint folder (blip.json), a Hugging Face "
                    "save_pretrained folder (config.json) nor a salesforce/BLIP .pth file"]
        return []


class VqaEncoder:
    """``vqa`` sample -> ``{"images" [3, H, W], "question_ids" / "question_mask" [T], "answer_ids" /
    "answer_mask" [max_answers, Ta], "answer_weights" [max_answers]}`` (padding answers weigh 0)."""

    def __init__(self, questions: BlipText, answers: BlipText, image_size: int, max_answers: int,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.questions, self.answers, self.image_size = questions, answers, image_size
        self.max_answers, self.max_pixels = max_answers, max_pixels

    def __call__(self, sample: dict) -> dict:
        image, question, answers, weights = vqa_fields(sample)
        kept = sorted(range(len(answers)), key=lambda i: -weights[i])[: self.max_answers]
        a_ids, a_mask = self.answers.encode([answers[i] for i in kept] + [""] * (self.max_answers - len(kept)))
        a_weights = torch.zeros(self.max_answers)
        a_weights[: len(kept)] = torch.tensor([weights[i] for i in kept])
        q_ids, q_mask = self.questions.encode([question])
        return {"images": decode_image(image, self.image_size, max_pixels=self.max_pixels), "question_ids": q_ids[0],
                "question_mask": q_mask[0], "answer_ids": a_ids, "answer_mask": a_mask, "answer_weights": a_weights}


def flat_answers(batch: dict) -> dict:
    """The batch's answers of weight > 0 as rows ``[N, Ta]``, with ``answer_question`` ``[N]`` (CPU tensors)."""
    keep = batch["answer_weights"] > 0  # [B, A]
    question = torch.arange(keep.shape[0])[:, None].expand_as(keep)
    return {"answer_ids": batch["answer_ids"][keep], "answer_mask": batch["answer_mask"][keep],
            "answer_weights": batch["answer_weights"][keep], "answer_question": question[keep]}


def sample_score(prediction: str, meta: dict) -> float:
    """VQA accuracy of one prediction: official against the raw answers, else the answer's weight (<= 1)."""
    if meta.get("weights") is None:
        return question_accuracy(normalize_answer(prediction), [str(a) for a in meta["answers"]])
    answers, weights = answer_weights([str(a) for a in meta["answers"]], meta["weights"])
    normalized = normalize_answer(prediction)
    return min(1.0, sum(w for a, w in zip(answers, weights) if normalize_answer(a) == normalized))


class BlipVqaTask(Task):
    name = "blip_vqa"
    Config = BlipVqaConfig
    data_kinds = (VQA_KIND,)
    media_tokens = False  # questions hold no image placeholders: a BERT vocabulary stays BLIP's

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        out = []
        section = cfg.model.blip_vqa
        if cfg.model.lm is not None:
            out.append(f"model.lm: task {cls.name!r} has its own text transformer; remove model.lm")
        if cfg.model.gradient_checkpointing:
            out.append(f"model.gradient_checkpointing: not available for task {cls.name!r}")
        if cfg.data.eval is not None and section.inference == "rank" and not section.answer_list:
            out.append("model.blip_vqa.answer_list: inference: rank needs the candidate answers (a JSON list)")
        return out

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.text = BlipText(tokenizer)
        self.answer_text = BlipText(tokenizer, context_length=self.config.max_answer_tokens)

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        v, init = self.cfg.model.vision, self.config.init
        if not init:
            config = self.text.med_config(max_position_embeddings=max(64, self.text.context_length),
                                          encoder_width=v.width, **asdict(self.config.text))
            return BlipVQA(build_vision(self.cfg), config)
        model = vqa_from_checkpoint(init, image_size=v.image_size, text_overrides=self.text.special_ids(),
                                    source=f"model.blip_vqa.init {init}")
        check_init(model, self.text.vocab_size, v.image_size, "model.blip_vqa.init")
        freeze_init_vision(model, self.cfg.model.vision, "model.blip_vqa.init")
        return model

    def peer_exporters(self) -> dict:
        return {"hf": self._write_hf}

    def _write_hf(self, module: nn.Module, out_dir: str) -> None:
        """A transformers ``BlipForQuestionAnswering`` ``save_pretrained`` directory: BLIP's ViT, and one
        width for the image, the question and the answer (Hugging Face's ``encoder_hidden_size``)."""
        c = module.config
        if not all(k.startswith("visual_encoder.model.") for k in module.state_dict() if k.startswith("visual_")):
            raise ValueError("model.blip_vqa.init: this run's ViT is vlmcore's (model.vision), not BLIP's; "
                             "BlipForQuestionAnswering holds BLIP's ViT: start the run from a BLIP checkpoint")
        if c.encoder_width != c.hidden_size:
            raise ValueError(f"model.blip_vqa: BlipForQuestionAnswering has one width for images and text; this "
                             f"model's image width is {c.encoder_width}, its text width {c.hidden_size}")
        save_hf_blip(module, out_dir, "BlipForQuestionAnswering", rename=hf_vqa_name, config=hf_blip_config(module))

    def encoder(self, kind: str, max_images: int) -> VqaEncoder:
        return VqaEncoder(self.text, self.answer_text, self.cfg.model.vision.image_size, self.config.max_answers,
                          self.cfg.data.max_image_pixels)

    def eval_encoder(self) -> VqaEncoder:
        return self.encoder(VQA_KIND, 1)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        answers = move(flat_answers(batch), device)
        batch = move(batch, device)
        loss = model(batch["images"], batch["question_ids"], batch["question_mask"], answers["answer_ids"],
                     answers["answer_mask"], answers["answer_weights"], answers["answer_question"])
        return loss.float(), {}

    def batch_tokens(self, batch: dict) -> int:
        return int(batch["question_mask"].sum())

    def _candidates(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        with open(self.config.answer_list, encoding="utf-8") as f:
            answers = json.load(f)
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"model.blip_vqa.answer_list: {self.config.answer_list!r} must hold a non-empty JSON "
                             "list of strings")
        ids, mask = self.answer_text.encode(answers)
        return answers, ids, mask

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        device, scores = ctx.info.device, []
        if self.config.inference == "rank":
            answers, cand_ids, cand_mask = self._candidates()
            cand_ids, cand_mask = cand_ids.to(device), cand_mask.to(device)
        for batch, metas in eval_batches(ctx.shards, ctx.encoder, ctx.eval.batch_size, 0, 1, ctx.eval.max_batches):
            images = batch["images"].to(device, ctx.dtype)
            q_ids, q_mask = batch["question_ids"].to(device), batch["question_mask"].to(device)
            if self.config.inference == "rank":
                best = module.rank_answers(images, q_ids, q_mask, cand_ids, cand_mask, k_test=self.config.k_test)
                predictions = [answers[i] for i in best.tolist()]
            else:
                out = module.generate(images, q_ids, q_mask, num_beams=self.config.num_beams,
                                      max_length=self.config.max_answer_tokens)
                predictions = [self.text.decode(row[1:]) for row in out]
            scores += [sample_score(p, meta) for p, meta in zip(predictions, metas)]
        return {"eval_samples": len(scores), "vqa_acc": sum(scores) / max(len(scores), 1)}
