"""How the trainer's tokenizers feed BLIP: special tokens and the id layout of a caption.

A :class:`~vlmcore.train.tokenizer.Tokenizer` has ``<pad>`` and ``<eos>`` but no BERT ``[CLS]``,
``[DEC]``, ``[ENC]``. BLIP's text transformer gets three extra ids after the tokenizer's
vocabulary: ``[CLS] = V``, ``[DEC] = V + 1`` (BLIP's BOS), ``[ENC] = V + 2``; ``<eos>`` plays
``[SEP]``. A caption is ``[CLS] tokens... <eos>`` padded with ``<pad>``; :class:`vlmcore.BLIP`
swaps the first id for ``[ENC]`` (ITM) or ``[DEC]`` (LM) itself.
"""

from __future__ import annotations

import torch

from vlmcore.blip import MEDConfig

from .tokenizer import Tokenizer


class BlipText:
    """Caption <-> ids for BLIP over ``tokenizer`` (module docstring for the layout)."""

    def __init__(self, tokenizer: Tokenizer, context_length: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = int(context_length or tokenizer.context_length)
        base = tokenizer.vocab_size
        self.cls_token_id, self.dec_token_id, self.enc_token_id = base, base + 1, base + 2
        self.vocab_size = base + 3

    def med_config(self, **sizes) -> MEDConfig:
        """A :class:`MEDConfig` with this layout's vocabulary and special ids; ``sizes`` = the rest."""
        return MEDConfig(vocab_size=self.vocab_size, pad_token_id=self.tokenizer.pad_token_id,
                         bos_token_id=self.dec_token_id, enc_token_id=self.enc_token_id,
                         sep_token_id=self.tokenizer.eos_token_id, **sizes)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a caption prompt (BLIP: "a picture of "), without special tokens."""
        return self.tokenizer.encode(prompt) if prompt else []

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [n, T], attention mask [n, T])``: ``[CLS] tokens <eos>``, truncated to T, padded."""
        rows, masks = [], []
        for caption in captions:
            tokens = self.tokenizer.encode(caption)[: self.context_length - 2]
            ids, mask = self.tokenizer.pad([self.cls_token_id, *tokens, self.tokenizer.eos_token_id],
                                           self.context_length)
            rows.append(ids)
            masks.append(mask)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)

    def decode(self, ids) -> str:
        """Text of generated ids, up to the first ``<eos>`` / pad; the BLIP special ids are dropped."""
        out = []
        for token in (int(i) for i in ids):
            if token in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
                break
            if token < self.tokenizer.vocab_size:
                out.append(token)
        return self.tokenizer.decode(out).strip()
