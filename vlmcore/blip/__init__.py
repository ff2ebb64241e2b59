"""BLIP (Li et al. 2022), a family in files, as Hugging Face lays one out:

- :mod:`~vlmcore.blip.text`: the MED text transformer (:class:`MEDConfig`, :class:`MEDTextModel`, :class:`LMHead`);
- :mod:`~vlmcore.blip.model`: :class:`BLIP` (ITC, ITM, captioning, momentum encoders and queues,
  retrieval, generation), :func:`blip_vision_encoder`, :func:`alpha_ramp`, :func:`sample_hard_negatives`,
  :func:`blip_retrieval_metrics`;
- :mod:`~vlmcore.blip.convert`: Hugging Face and salesforce/BLIP weights by name;
- :mod:`~vlmcore.blip.vqa`: :class:`BlipVQA` (question encoder -> answer decoder; rank / generate);
- :mod:`~vlmcore.blip.nlvr`: :class:`BlipNLVR` (two images, one sentence, twin cross-attention);
- :mod:`~vlmcore.blip.heads_convert`: their Hugging Face / salesforce weights by name;
- :mod:`~vlmcore.blip.build`: specs, :func:`build_blip`, :func:`save_blip`, :func:`load_blip`,
  :func:`blip_from_salesforce`;
- :mod:`~vlmcore.blip.video`: zero-shot text <-> video retrieval by frame concatenation
  (:func:`encode_video`, :func:`video_retrieval_scores`, :func:`video_retrieval_metrics`).

Every public name is importable from ``vlmcore.blip``.
"""

from vlmcore.blip.build import (
    blip_from_salesforce,
    build_blip,
    is_salesforce_checkpoint,
    load_blip,
    salesforce_blip_spec,
    save_blip,
)
from vlmcore.blip.convert import MOMENTUM_STATE, read_salesforce_checkpoint
from vlmcore.blip.model import (
    BLIP,
    alpha_ramp,
    blip_retrieval_metrics,
    blip_vision_encoder,
    sample_hard_negatives,
)
from vlmcore.blip.nlvr import BlipNLVR
from vlmcore.blip.text import MODES, DecoderCache, LMHead, MEDConfig, MEDLayer, MEDTextModel
from vlmcore.blip.video import VideoEncoding, encode_video, video_retrieval_metrics, video_retrieval_scores
from vlmcore.blip.vqa import BlipVQA

__all__ = [
    "BLIP",
    "BlipNLVR",
    "BlipVQA",
    "DecoderCache",
    "LMHead",
    "MEDConfig",
    "MEDLayer",
    "MEDTextModel",
    "MODES",
    "MOMENTUM_STATE",
    "VideoEncoding",
    "alpha_ramp",
    "blip_from_salesforce",
    "blip_retrieval_metrics",
    "blip_vision_encoder",
    "build_blip",
    "encode_video",
    "is_salesforce_checkpoint",
    "load_blip",
    "read_salesforce_checkpoint",
    "salesforce_blip_spec",
    "sample_hard_negatives",
    "save_blip",
    "video_retrieval_metrics",
    "video_retrieval_scores",
]
