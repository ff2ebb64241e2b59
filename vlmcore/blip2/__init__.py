"""BLIP-2 (Li et al. 2023), a family in files:

- :mod:`~vlmcore.blip2.qformer`: the Querying Transformer (:class:`QFormer`, :func:`self_attention_mask`);
- :mod:`~vlmcore.blip2.stage1`: :class:`Blip2Stage1` (ITC, ITM with hard negatives, ITG, retrieval),
  :func:`fetch_rows`, :func:`sample_hard_negatives`, :func:`soft_target_cross_entropy`;
- :mod:`~vlmcore.blip2.stage2`: :class:`Blip2LM` (the Q-Former in front of a frozen LM);
- :mod:`~vlmcore.blip2.convert`: Hugging Face weights by name (:func:`hf_qformer_key`, :func:`hf_head_key`);
- :mod:`~vlmcore.blip2.hf`: whole HF ``Blip2ForConditionalGeneration`` directories, both ways
  (:func:`load_hf_blip2` + :func:`blip2_lm_from_hf`, :func:`export_hf_blip2`), and stage 1's
  ``Blip2ForImageTextRetrieval`` (:func:`blip2_stage1_from_hf`, :func:`export_hf_blip2_stage1`);
- :mod:`~vlmcore.blip2.video`: zero-shot text <-> video retrieval over concatenated frame tokens
  (``encode_video``, ``video_retrieval_scores``: import them from that module, ``vlmcore.blip`` has
  functions of the same names).

Every public name is importable from ``vlmcore.blip2``; :func:`recall_at_k` is
:func:`vlmcore.retrieval.recall_at_k`, :func:`gather_rows` :func:`vlmcore.distributed.gather_rows`.
"""

from vlmcore.blip2.convert import hf_head_key, hf_qformer_key, load_mapped
from vlmcore.blip2.hf import (
    blip2_lm_from_hf,
    blip2_stage1_from_hf,
    blip2_vision_from_hf,
    export_hf_blip2,
    export_hf_blip2_stage1,
    load_hf_blip2,
)
from vlmcore.blip2.qformer import MASK_MODES, QFormer, QFormerLayer, self_attention_mask
from vlmcore.blip2.stage1 import (
    Blip2Stage1,
    fetch_rows,
    sample_hard_negatives,
    soft_target_cross_entropy,
    stage1_qformer_state,
)
from vlmcore.blip2.stage2 import Blip2LM
from vlmcore.distributed import gather_rows
from vlmcore.retrieval import recall_at_k

__all__ = [
    "Blip2LM",
    "Blip2Stage1",
    "MASK_MODES",
    "QFormer",
    "QFormerLayer",
    "blip2_lm_from_hf",
    "blip2_stage1_from_hf",
    "blip2_vision_from_hf",
    "export_hf_blip2",
    "export_hf_blip2_stage1",
    "fetch_rows",
    "gather_rows",
    "hf_head_key",
    "hf_qformer_key",
    "load_hf_blip2",
    "load_mapped",
    "recall_at_k",
    "sample_hard_negatives",
    "self_attention_mask",
    "soft_target_cross_entropy",
    "stage1_qformer_state",
]
