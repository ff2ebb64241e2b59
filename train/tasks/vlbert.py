"""VL-BERT pre-training (:class:`vlmcore.VLBERT`, one stream over ``[text; regions]``).

Same data and text layout as the ``vilbert`` task (see ``train/tasks/vilbert.py``). Loss: BERT
masking of 15% of the text tokens (80/10/10) -> masked LM, and masking of 15% of the regions (90%
zeroed) -> masked RoI classification against the detector's most likely class. VL-BERT has no
image-text alignment objective. Eval (held-out pairs, masks drawn from a fixed seed so every eval
sees the same corruption): masked-token accuracy and masked-region classification accuracy.

Config section ``model.vlbert`` (the text-stream sizes of :class:`RegionBertConfig` are used).
"""

from __future__ import annotations

import torch
from torch import nn
from vlmcore.train.data.pipeline import eval_batches
from vlmcore.train.runtime.distributed import all_reduce_sum
from vlmcore.train.tasks.base import EvalContext
from vlmcore.train.tasks.common import in_step, move
from vlmcore.train.tasks.vilbert import RegionBertConfig, RegionTask

import vlmcore
from vlmcore.vilbert import IGNORE_INDEX, mask_regions, mask_tokens, masked_region_classification, mlm_loss

EVAL_SEED = 1234


class VlbertTask(RegionTask):
    name = "vlbert"
    Config = RegionBertConfig

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        return vlmcore.VLBERT(self.model_config(), image_token_id=self.tok.media_token_id)

    def _corrupt(self, b: dict, generator: torch.Generator | None):
        """BERT-masked ``input_ids [B, T]`` and their MLM labels, masked ``region_features [B, R, F]`` and the
        region labels ``[B, R]`` (1 = masked); ``generator`` None draws from the global RNG."""
        c = self.config
        ids, mlm_labels = mask_tokens(b["input_ids"], mask_token_id=self.mask_id, vocab_size=self.tok.vocab_size,
                                      special_tokens=self.special_tokens(b["input_ids"]), generator=generator,
                                      probability=c.mlm_probability)
        features, region_labels = mask_regions(b["region_features"], b["region_boxes"], b["region_mask"],
                                               generator=generator, probability=c.region_mask_probability)
        return ids, mlm_labels, features, region_labels

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        b = move(batch, device)
        ids, mlm_labels, features, region_labels = self._corrupt(b, None)
        out = model(ids, features, b["region_boxes"], b["attention_mask"], b["region_mask"])
        mlm = mlm_loss(out["mlm_logits"], mlm_labels)
        region = masked_region_classification(out["region_logits"], b["class_probs"], region_labels)
        return (mlm + region).float(), {"mlm_loss": mlm.detach(), "region_loss": region.detach()}

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        info, ev = ctx.info, ctx.eval
        generator = torch.Generator(device=info.device).manual_seed(EVAL_SEED + info.rank)
        counts = [0.0] * 4  # token hits, masked tokens, region hits, masked regions
        batches = eval_batches(ctx.shards, ctx.encoder, ev.batch_size, info.rank, info.world_size, ev.max_batches)
        for batch, _, real in in_step(batches, info, ctx.zero_stage, ctx.shards, ctx.encoder):
            b = move(batch, info.device)
            ids, mlm_labels, features, region_labels = self._corrupt(b, generator)
            out = module(ids, features.to(ctx.dtype), b["region_boxes"].to(ctx.dtype), b["attention_mask"],
                         b["region_mask"])
            chosen = mlm_labels != IGNORE_INDEX
            token_hits = ((out["mlm_logits"].argmax(-1) == mlm_labels) & chosen).sum()
            masked = region_labels == 1
            region_hits = ((out["region_logits"].argmax(-1) == b["class_probs"].argmax(-1)) & masked).sum()
            if not real:
                continue
            counts = [counts[0] + float(token_hits), counts[1] + float(chosen.sum()),
                      counts[2] + float(region_hits), counts[3] + float(masked.sum())]
        token_hits, tokens, region_hits, regions = all_reduce_sum(counts, info.device)
        return {"mlm_acc": token_hits / max(tokens, 1), "masked_region_acc": region_hits / max(regions, 1),
                "eval_masked_tokens": int(tokens), "eval_masked_regions": int(regions)}
