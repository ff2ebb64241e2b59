"""How the trainer's tokenizers feed BLIP: special tokens and the id layout of a caption.

Two layouts, chosen by the tokenizer:

- a BERT vocabulary (an HF tokenizer directory with ``[CLS]`` and ``[SEP]``, e.g. BLIP's
  ``bert-base-uncased``): BLIP's own, so salesforce / HF BLIP checkpoints line up id for id:
  ``[CLS]`` and ``[SEP]`` are BERT's, ``[DEC] = V`` (BLIP's BOS), ``[ENC] = V + 1``, vocabulary
  ``V + 2`` (30,524 for bert-base-uncased);
- any other :class:`~vlmcore.train.data.tokenizer.Tokenizer` (``<pad>`` and ``<eos>`` but no ``[CLS]``):
  three extra ids after the vocabulary, ``[CLS] = V``, ``[DEC] = V + 1``, ``[ENC] = V + 2``;
  ``<eos>`` plays ``[SEP]``.

A caption is ``[CLS] tokens... [SEP]`` padded with the pad id; :class:`vlmcore.BLIP` swaps the
first id for ``[ENC]`` (ITM) or ``[DEC]`` (LM) itself.
"""

from __future__ import annotations

import torch
from vlmcore.train.data.tokenizer import Tokenizer

from vlmcore.blip import MEDConfig


class BlipText:
    """Caption <-> ids for BLIP over ``tokenizer`` (module docstring for the layout)."""

    def __init__(self, tokenizer: Tokenizer, context_length: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = int(context_length or tokenizer.context_length)
        base = tokenizer.vocab_size
        hf = getattr(tokenizer, "_hf", None)
        self.bert_layout = hf is not None and hf.cls_token_id is not None and hf.sep_token_id is not None
        if self.bert_layout:  # BLIP's own ids (init_tokenizer in salesforce/BLIP: [DEC] then [ENC] appended)
            self.cls_token_id, self.dec_token_id, self.enc_token_id = hf.cls_token_id, base, base + 1
            self.sep_token_id = hf.sep_token_id
            self.vocab_size = base + 2
        else:
            self.cls_token_id, self.dec_token_id, self.enc_token_id = base, base + 1, base + 2
            self.sep_token_id = tokenizer.eos_token_id
            self.vocab_size = base + 3

    def med_config(self, **sizes) -> MEDConfig:
        """A :class:`MEDConfig` with this layout's vocabulary and special ids; ``sizes`` = the rest."""
        return MEDConfig(vocab_size=self.vocab_size, **self.special_ids(), **sizes)

    def special_ids(self) -> dict[str, int]:
        """The :class:`MEDConfig` special ids of this layout (for checkpoints that do not store them)."""
        return {"pad_token_id": self.tokenizer.pad_token_id, "bos_token_id": self.dec_token_id,
                "enc_token_id": self.enc_token_id, "sep_token_id": self.sep_token_id}

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a caption prompt (BLIP: "a picture of "), without special tokens."""
        return self.tokenizer.encode(prompt) if prompt else []

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [n, T], attention mask [n, T])``: ``[CLS] tokens [SEP]``, truncated to T, padded."""
        rows, masks = [], []
        for caption in captions:
            tokens = self.tokenizer.encode(caption)[: self.context_length - 2]
            ids, mask = self.tokenizer.pad([self.cls_token_id, *tokens, self.sep_token_id],
                                           self.context_length)
            rows.append(ids)
            masks.append(mask)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)

    def decode(self, ids) -> str:
        """Text of generated ids, up to the first ``[SEP]`` / pad; the BLIP special ids are dropped."""
        out = []
        for token in (int(i) for i in ids):
            if token in (self.sep_token_id, self.tokenizer.pad_token_id):
                break
            if token < self.tokenizer.vocab_size and token != self.cls_token_id:
                out.append(token)
        return self.tokenizer.decode(out).strip()
