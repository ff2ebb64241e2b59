"""Tokenizers for the trainer: open_clip's CLIP tokenizer, any HF tokenizer from a local path, or
a small one trained here.

:class:`Tokenizer` wraps open_clip's ``SimpleTokenizer`` (``kind="open_clip"``; its BPE vocabulary
ships inside the open_clip package), a ``tokenizers`` JSON file or a local Hugging Face tokenizer
directory behind one interface, with the special tokens the tasks need:

- ``<pad>`` (padding, ignored by the losses), ``<eos>`` (end of text; CLIP's end-of-text token),
- only when the task asks for them (``media_tokens=True``: flamingo, frozen): ``<image>`` (Flamingo
  media token, Frozen image placeholder) and ``<|endofchunk|>`` (Flamingo).

Missing special tokens are added (a Flamingo over a real LM then needs
``train_new_token_embeddings``). :func:`train_word_tokenizer` trains a word-level tokenizer with
the ``tokenizers`` library (nothing is downloaded): what the demo uses on the shapes captions.

CLIP tokenizers (``kind="open_clip"``, or an HF directory holding a ``CLIPTokenizer``) follow
OpenCLIP's convention exactly: ``<|startoftext|> text <|endoftext|>``, truncated to the context
length with the end token kept last, padded with id 0; text ftfy-fixed (open_clip always; HF:
where ftfy is installed), HTML-unescaped, whitespace-collapsed and lower-cased.
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


TOKENIZER_KINDS = ("auto", "open_clip")
CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"


def _clip_clean(text: str) -> str:
    """OpenCLIP's text cleaning: ftfy fix (where installed), HTML unescape twice, whitespace, lower case."""
    import html

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


class Tokenizer:
    """Text -> token ids with fixed-length padding.

    Args:
        path: a ``tokenizers`` JSON file, or a local HF tokenizer directory (``AutoTokenizer``);
            unused (must be empty) with ``kind="open_clip"``.
        context_length: T of :meth:`__call__`'s output (OpenCLIP: 77).
        kind: ``"auto"`` (by ``path``) or ``"open_clip"`` (open_clip's own ``SimpleTokenizer``; needs
            the open_clip package).
        media_tokens: add ``<image>`` and ``<|endofchunk|>`` when missing (the tasks that place images
            in text ask for them; CLIP does not). Without them ``media_token_id`` / ``eoc_token_id``
            are None.

    ``tok(texts)`` -> LongTensor ``[n, T]``: the CLIP text input (``vlmcore.zero_shot_classifier``
    calls it with prompts). CLIP tokenizers (``start_token_id`` set): OpenCLIP's ``tokenize``
    exactly (start, text, end, zeros). Others: each text's ids followed by ``<eos>``, truncated to T
    (the last position then holds ``<eos>``), padded with ``pad_token_id``. A BERT vocabulary (an HF
    directory with ``[SEP]`` and no eos token) uses ``[SEP]`` as its ``<eos>``; nothing is added.
    """

    def __init__(self, path: str = "", context_length: int = 32, *, kind: str = "auto", media_tokens: bool = True):
        if not isinstance(context_length, int) or context_length < 4:
            raise ValueError(f"context_length must be an int >= 4, got {context_length!r}")
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")
        self.context_length = context_length
        self.path = path
        self.kind = kind
        self.start_token_id: int | None = None
        self._tok = self._hf = self._open_clip = None
        wanted = [MEDIA, EOC] if media_tokens else []
        if kind == "open_clip":
            media_ids = self._load_open_clip(path, media_tokens)
        elif os.path.isfile(path):
            media_ids = self._load_json(path, wanted)
        elif os.path.isdir(path):
            media_ids = self._load_hf_directory(path, wanted)
        else:
            raise ValueError(f"tokenizer path {path!r} is neither a tokenizers JSON file nor a directory")
        self.media_token_id, self.eoc_token_id = media_ids.get(MEDIA), media_ids.get(EOC)

    def _load_open_clip(self, path: str, media_tokens: bool) -> dict[str, int]:
        """open_clip's bundled ``SimpleTokenizer``: it has no media tokens (returns none)."""
        if path:
            raise ValueError("tokenizer kind 'open_clip' uses open_clip's bundled vocabulary: leave path empty")
        if media_tokens:
            raise ValueError("tokenizer kind 'open_clip' has no <image> / <|endofchunk|> tokens; the "
                             "flamingo and frozen tasks need the language model's own tokenizer (path)")
        from open_clip.tokenizer import SimpleTokenizer

        self._open_clip = SimpleTokenizer(context_length=self.context_length)
        self.vocab_size = int(self._open_clip.vocab_size)
        self.start_token_id = int(self._open_clip.sot_token_id)
        self.eos_token_id = int(self._open_clip.eot_token_id)
        self.pad_token_id = 0
        return {}

    def _load_json(self, path: str, wanted: list[str]) -> dict[str, int]:
        """A ``tokenizers`` JSON file, with the missing special tokens added; returns the ids of ``wanted``."""
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(path)
        missing = [t for t in [PAD, EOS, UNK, *wanted] if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens(missing)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.pad_token_id, self.eos_token_id = self._tok.token_to_id(PAD), self._tok.token_to_id(EOS)
        return {t: self._tok.token_to_id(t) for t in wanted}

    def _load_hf_directory(self, path: str, wanted: list[str]) -> dict[str, int]:
        """A local Hugging Face tokenizer directory (CLIP, BERT or any other vocabulary, see the class
        docstring), with the missing special tokens added; returns the ids of ``wanted``."""
        from transformers import AutoTokenizer

        self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        is_clip = self._hf.bos_token == CLIP_START and self._hf.eos_token == CLIP_END
        extra = [t for t in wanted if t not in self._hf.get_vocab()]
        if extra:
            self._hf.add_special_tokens({"additional_special_tokens": extra})
        if is_clip:
            # OpenCLIP's convention, not the HF tokenizer's own padding with <|endoftext|>.
            self.start_token_id, self.eos_token_id, self.pad_token_id = (
                self._hf.bos_token_id, self._hf.eos_token_id, 0)
        elif self._hf.eos_token is None and self._hf.sep_token is not None:
            # BERT vocabularies end a sequence with [SEP]: it plays <eos> (no token is added, so
            # the vocabulary stays the one BLIP / ViLBERT checkpoints were trained with)
            if self._hf.pad_token is None:
                self._hf.add_special_tokens({"pad_token": PAD})
            self.pad_token_id, self.eos_token_id = self._hf.pad_token_id, self._hf.sep_token_id
        else:
            if self._hf.eos_token is None:
                self._hf.add_special_tokens({"eos_token": EOS})
            if self._hf.pad_token is None:
                self._hf.add_special_tokens({"pad_token": PAD})
            self.pad_token_id, self.eos_token_id = self._hf.pad_token_id, self._hf.eos_token_id
        self.vocab_size = len(self._hf)
        return {t: self._hf.convert_tokens_to_ids(t) for t in wanted}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text are recognized; no start/eos added)."""
        if self._open_clip is not None:
            return self._open_clip.encode(text)
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        if self.start_token_id is not None:
            text = _clip_clean(text)
        return self._hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._open_clip is not None:
            return self._open_clip.decode(ids)
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
            if self.start_token_id is not None:
                ids = [self.start_token_id] + self.encode(text)[: self.context_length - 2] + [self.eos_token_id]
            else:
                ids = self.encode(text)[: self.context_length - 1] + [self.eos_token_id]
            rows.append(self.pad(ids)[0])
        return torch.tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return self.vocab_size
