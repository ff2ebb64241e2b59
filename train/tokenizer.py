"""Tokenizers for the trainer: any HF tokenizer from a local path, or a small one trained here.

:class:`Tokenizer` wraps either a ``tokenizers`` JSON file or a local Hugging Face tokenizer
directory behind one interface, with the special tokens the tasks need:

- ``<pad>`` (padding, ignored by the losses), ``<eos>`` (end of text; CLIP's end-of-text token),
- ``<image>`` (Flamingo media token, Frozen image placeholder), ``<|endofchunk|>`` (Flamingo).

Missing special tokens are added (a Flamingo over a real LM then needs
``train_new_token_embeddings``). :func:`train_word_tokenizer` trains a word-level tokenizer with
the ``tokenizers`` library (nothing is downloaded): what the demo uses on the shapes captions.
"""

from __future__ import annotations

import os

import torch

PAD, EOS, UNK, MEDIA, EOC = "<pad>", "<eos>", "<unk>", "<image>", "<|endofchunk|>"
SPECIAL_TOKENS = [PAD, EOS, UNK, MEDIA, EOC]


def train_word_tokenizer(text_file: str, out_path: str, min_frequency: int = 1) -> str:
    """Train a lower-cased word-level tokenizer on ``text_file`` and save it to ``out_path`` (JSON)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    if not os.path.isfile(text_file):
        raise ValueError(f"text_file {text_file!r} does not exist")
    tok = HFTokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # Split on whitespace, and keep the special tokens (which contain punctuation) whole.
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency)
    tok.train([text_file], trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, out_path)
    return out_path


class Tokenizer:
    """Text -> token ids with fixed-length padding.

    Args:
        path: a ``tokenizers`` JSON file, or a local HF tokenizer directory (``AutoTokenizer``).
        context_length: T of :meth:`__call__`'s output.

    ``tok(texts)`` -> LongTensor ``[n, T]``: each text's ids followed by ``<eos>``, truncated to T
    (the last position then holds ``<eos>``), padded with ``pad_token_id``: the CLIP text input
    (``vlmcore.zero_shot_classifier`` calls it with prompts).
    """

    def __init__(self, path: str, context_length: int = 32):
        if not isinstance(context_length, int) or context_length < 4:
            raise ValueError(f"context_length must be an int >= 4, got {context_length!r}")
        self.context_length = context_length
        self.path = path
        if os.path.isfile(path):
            from tokenizers import Tokenizer as HFTokenizer

            self._tok = HFTokenizer.from_file(path)
            missing = [t for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is None]
            if missing:
                self._tok.add_special_tokens(missing)
            self._hf = None
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
            self.pad_token_id, self.eos_token_id = ids[PAD], ids[EOS]
        elif os.path.isdir(path):
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._tok = None
            extra = [t for t in (MEDIA, EOC) if t not in self._hf.get_vocab()]
            if extra:
                self._hf.add_special_tokens({"additional_special_tokens": extra})
            if self._hf.eos_token is None:
                self._hf.add_special_tokens({"eos_token": EOS})
            if self._hf.pad_token is None:
                self._hf.add_special_tokens({"pad_token": PAD})
            self.vocab_size = len(self._hf)
            self.pad_token_id, self.eos_token_id = self._hf.pad_token_id, self._hf.eos_token_id
            ids = {MEDIA: self._hf.convert_tokens_to_ids(MEDIA), EOC: self._hf.convert_tokens_to_ids(EOC)}
        else:
            raise ValueError(f"tokenizer path {path!r} is neither a tokenizers JSON file nor a directory")
        self.media_token_id, self.eoc_token_id = ids[MEDIA], ids[EOC]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text are recognized; no eos added)."""
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._hf.decode(ids)

    def pad(self, ids: list[int], length: int | None = None) -> tuple[list[int], list[int]]:
        """Truncate/pad ``ids`` to ``length`` (default T); returns (ids, attention mask)."""
        length = length or self.context_length
        ids = ids[:length]
        n = len(ids)
        return ids + [self.pad_token_id] * (length - n), [1] * n + [0] * (length - n)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = self.encode(text)[: self.context_length - 1] + [self.eos_token_id]
            rows.append(self.pad(ids)[0])
        return torch.tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return self.vocab_size
