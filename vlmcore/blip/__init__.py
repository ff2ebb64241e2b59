"""BLIP (Li et al. 2022), a family in files, as Hugging Face lays one out:

- :mod:`~vlmcore.blip.text`: the MED text transformer (:class:`MEDConfig`, :class:`MEDTextModel`, :class:`LMHead`);
- :mod:`~vlmcore.blip.model`: :class:`BLIP` (ITC, ITM, captioning, momentum encoders and queues,
  retrieval, generation), :func:`blip_vision_encoder`, :func:`alpha_ramp`, :func:`sample_hard_negatives`,
  :func:`blip_retrieval_metrics`;
- :mod:`~vlmcore.blip.convert`: Hugging Face and salesforce/BLIP weights by name;
- :mod:`~vlmcore.blip.build`: specs, :func:`build_blip`, :func:`save_blip`, :func:`load_blip`,
  :func:`blip_from_salesforce`.

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
from vlmcore.blip.text import MODES, DecoderCache, LMHead, MEDConfig, MEDLayer, MEDTextModel

__all__ = [
    "BLIP",
    "DecoderCache",
    "LMHead",
    "MEDConfig",
    "MEDLayer",
    "MEDTextModel",
    "MODES",
    "MOMENTUM_STATE",
    "alpha_ramp",
    "blip_from_salesforce",
    "blip_retrieval_metrics",
    "blip_vision_encoder",
    "build_blip",
    "is_salesforce_checkpoint",
    "load_blip",
    "read_salesforce_checkpoint",
    "salesforce_blip_spec",
    "sample_hard_negatives",
    "save_blip",
]
