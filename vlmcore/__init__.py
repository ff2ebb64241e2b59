"""vlmcore: fused Triton kernels and training core for vision-language models on frozen LMs.

Modules (``nn.Module``) built on the ops of :mod:`vlmcore.kernels`; the trainer lives in
:mod:`vlmcore.train`, the benchmarks in :mod:`vlmcore.bench`.

- Building blocks: :class:`MaskedCrossAttention`, :class:`GatedCrossAttentionBlock`,
  :class:`PerceiverAttention`, :class:`PerceiverResampler`, :class:`ContrastiveLoss`,
  :class:`SigLIPLoss`.
- Vision: :class:`VisionTransformer` and adapters (:class:`OpenCLIPVisionAdapter`,
  :class:`TimmViTAdapter`, :class:`HFVisionAdapter`), :func:`pooled_features`.
- CLIP / SigLIP: :class:`CLIP` (text tower :class:`TextTransformer`; + :func:`zero_shot_classifier`,
  :func:`zero_shot_predict`, :func:`retrieval_metrics`).
- Flamingo: :class:`Flamingo` (+ :func:`find_decoder_layers`); Frozen: :class:`FrozenPrefix`.
- BLIP: :class:`BLIP` (text model config :class:`MEDConfig`, :func:`blip_vision_encoder`,
  :func:`blip_from_salesforce`; more in :mod:`vlmcore.blip`).
- BLIP-2: :class:`QFormer`, :class:`Blip2Stage1` (ITC / ITM / ITG), :class:`Blip2LM` (stage 2).
- Region features: :class:`ViLBERT` and :class:`VLBERT` (:class:`ViLBERTConfig`,
  :class:`CoAttentionLayer`).
- Evaluation in the field's units (caption metrics, VQA accuracy, zero-shot metadata, linear
  probe, benchmark converters; the ``vlmcore-eval`` command): :mod:`vlmcore.eval`.

One page per model family in the repository's ``docs/models/``.
"""

from vlmcore import kernels
from vlmcore.blip import BLIP, MEDConfig, blip_from_salesforce, blip_vision_encoder
from vlmcore.blip2 import Blip2LM, Blip2Stage1, QFormer
from vlmcore.clip import CLIP, TextTransformer, retrieval_metrics, zero_shot_classifier, zero_shot_predict
from vlmcore.cross_attention import GatedCrossAttentionBlock, MaskedCrossAttention
from vlmcore.flamingo import Flamingo, find_decoder_layers
from vlmcore.frozen import FrozenPrefix
from vlmcore.losses import ContrastiveLoss, SigLIPLoss
from vlmcore.resampler import PerceiverAttention, PerceiverResampler
from vlmcore.vilbert import VLBERT, CoAttentionLayer, ViLBERT, ViLBERTConfig
from vlmcore.vision import (
    HFVisionAdapter,
    OpenCLIPVisionAdapter,
    TimmViTAdapter,
    VisionTransformer,
    pooled_features,
)

__version__ = "0.1.0"

__all__ = [
    "Blip2LM",
    "Blip2Stage1",
    "CLIP",
    "CoAttentionLayer",
    "ContrastiveLoss",
    "Flamingo",
    "FrozenPrefix",
    "GatedCrossAttentionBlock",
    "HFVisionAdapter",
    "MaskedCrossAttention",
    "OpenCLIPVisionAdapter",
    "PerceiverAttention",
    "PerceiverResampler",
    "SigLIPLoss",
    "QFormer",
    "TextTransformer",
    "TimmViTAdapter",
    "VLBERT",
    "ViLBERT",
    "ViLBERTConfig",
    "VisionTransformer",
    "find_decoder_layers",
    "kernels",
    "pooled_features",
    "retrieval_metrics",
    "zero_shot_classifier",
    "zero_shot_predict",
    "BLIP",
    "MEDConfig",
    "blip_vision_encoder",
    "blip_from_salesforce",
]
