"""A tiny BLIP (random init) and a batch for it: the model tests and the 2-rank worker share them."""

from __future__ import annotations

import torch

from vlmcore import VisionTransformer
from vlmcore.blip import BLIP, MEDConfig

VOCAB = 40


def tiny_blip(queue_size=12, momentum=0.9, **kwargs) -> BLIP:
    vision = VisionTransformer(image_size=16, patch_size=8, width=32, depth=1, heads=2)
    config = MEDConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=16, encoder_width=32, pad_token_id=0,
                       bos_token_id=38, enc_token_id=39, sep_token_id=2)
    return BLIP(vision, config, embed_dim=16, queue_size=queue_size, momentum=momentum, **kwargs)


def tiny_batch(b=4, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 16, 16, generator=g)
    ids = torch.randint(3, 30, (b, length), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, -2:] = 0
    ids[0, -2:] = 0
    return images, ids, mask
