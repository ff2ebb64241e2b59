"""CLIP / SigLIP (Radford et al. 2021; Zhai et al. 2023), a family in files, as Hugging Face lays one out:

- :mod:`~vlmcore.clip.model`: :class:`CLIP` (image tower + :class:`TextTransformer`, the fused
  contrastive or sigmoid loss), :func:`zero_shot_classifier`, :func:`zero_shot_predict`;
- :mod:`~vlmcore.clip.convert`: whole models from open_clip and Hugging Face (:func:`clip_from_open_clip`,
  :func:`clip_from_hf`) and back (:func:`export_open_clip`, :func:`export_hf`), weights by name.

Every public name is importable from ``vlmcore.clip``.
"""

from vlmcore.clip.convert import (
    clip_from_hf,
    clip_from_open_clip,
    export_hf,
    export_open_clip,
)
from vlmcore.clip.model import CLIP, TextTransformer, retrieval_metrics, zero_shot_classifier, zero_shot_predict

__all__ = [
    "CLIP",
    "TextTransformer",
    "clip_from_hf",
    "clip_from_open_clip",
    "export_hf",
    "export_open_clip",
    "retrieval_metrics",
    "zero_shot_classifier",
    "zero_shot_predict",
]
