"""A tiny CLIP and its toy word tokenizer (the CLIP and SigLIP module tests share them)."""

from __future__ import annotations

import torch

import vlmcore

PAD, SOT, EOT = 0, 1, 2
WORDS = ["a", "photo", "of", "picture", "the", "red", "green", "blue", "gray"]
CLASSES = ["red", "green", "blue", "gray"]
CONTEXT = 8


def tokenizer(texts):
    """Toy word tokenizer: list[str] -> LongTensor [n, CONTEXT] (SOT ... EOT, zero-padded)."""
    out = torch.full((len(texts), CONTEXT), PAD, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = [SOT] + [3 + WORDS.index(w) for w in text.split()] + [EOT]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def tiny_clip(**overrides):
    cfg = dict(image_size=16, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2,
               vocab_size=3 + len(WORDS), context_length=CONTEXT, text_width=32, text_depth=1, text_heads=2,
               eot_token_id=EOT)
    cfg.update(overrides)
    return vlmcore.CLIP(16, **cfg)
