"""BLIP pre-training: ITC (momentum distillation, fused op, queues) + ITM (local hard negatives)
+ LM, as BLIP's ``blip_pretrain.py``; with the samples' image ids (``blip_common.py``), which are
unique per image on web data, ITC's targets equal BLIP pre-training's one-hot ones, and repeated
images are positives rather than negatives. Eval: retrieval Recall@k (ITC top-k re-ranked by ITM) and
caption token accuracy with / without images. Config section ``model.blip_pretrain``; the shared
behaviour is in ``blip_common.py``."""

from __future__ import annotations

from vlmcore.train.tasks.blip_common import BlipTaskBase


class BlipPretrainTask(BlipTaskBase):
    name = "blip_pretrain"
    losses = ("itc", "itm", "lm")
    all_rank_negatives = False
    use_prompt = False
    with_momentum = True
    hf_exports = {"hf_retrieval": "BlipForImageTextRetrieval", "hf_caption": "BlipForConditionalGeneration"}
    eval_kinds = ("retrieval", "caption")
