"""BLIP retrieval fine-tuning: ITC (momentum distillation) with image-id positives over the batch
and the queue + ITM with hard negatives drawn from every rank's batch, same-image pairs masked by
image id (BLIP's ``blip_retrieval.py``). Eval: Recall@k with ITM re-ranking of the ITC top
``k_test``. Config section ``model.blip_retrieval``."""

from __future__ import annotations

from vlmcore.train.tasks.blip_common import BlipTaskBase


class BlipRetrievalTask(BlipTaskBase):
    name = "blip_retrieval"
    losses = ("itc", "itm")
    all_rank_negatives = True
    use_prompt = False
    with_momentum = True
    eval_kinds = ("retrieval",)
