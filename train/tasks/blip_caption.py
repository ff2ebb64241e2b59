"""BLIP captioning fine-tuning: the image-grounded decoder's LM loss (label smoothing 0.1) on
``prompt + caption``, the prompt ("a picture of ") excluded from the loss, as BLIP's
``blip.py``/``train_caption.py``. No momentum encoders. Eval: caption token accuracy with and
without the images. The exported ``out_dir`` is a CapFilt captioner. Config section
``model.blip_caption``."""

from __future__ import annotations

from torch import nn
from vlmcore.train.tasks.blip_common import BlipTaskBase
from vlmcore.train.tasks.generation import SquashDecoder

from vlmcore.eval.generation import BlipEval


class BlipCaptionTask(BlipTaskBase):
    name = "blip_caption"
    losses = ("lm",)
    all_rank_negatives = False
    use_prompt = True
    with_momentum = False
    hf_exports = {"hf": "BlipForConditionalGeneration"}
    eval_kinds = ("caption",)
    generates = True

    def eval_model(self, module: nn.Module) -> BlipEval:
        return BlipEval(module, self.text.prompt_ids(self.prompt), self.text.decode)

    def eval_images(self) -> SquashDecoder:
        return SquashDecoder(self.cfg.model.vision.image_size)
