"""Tiny HF BLIP-2 models (random weights; no download) for the weight tests: ``Blip2ForConditionalGeneration``
(OPT LM) and the stage-1 ``Blip2ForImageTextRetrieval``."""

from __future__ import annotations

import torch
from transformers import Blip2Config
from transformers.models.blip_2.modeling_blip_2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

#: The sizes of tests/models/test_blip2_stage2.py: a 1-layer ViT on 8 px images (4 patches + CLS),
#: a 2-layer Q-Former with 4 queries, a 2-layer OPT.
QUERIES, VISION_WIDTH, IMAGE_SIZE = 4, 16, 8


def tiny_hf_blip2(vocab: int, image_token: int, *, image_size: int = IMAGE_SIZE, seed: int = 0) -> torch.nn.Module:
    """The model, eval mode, with queries and LayerNorms moved off their init (as after training)."""
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config={"hidden_size": VISION_WIDTH, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": image_size // 2},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 48, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        text_config={"model_type": "opt", "vocab_size": vocab, "hidden_size": 32, "ffn_dim": 48,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
                     "word_embed_proj_dim": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                     "dropout": 0.0},
        num_query_tokens=QUERIES, image_token_index=image_token)
    hf = Blip2ForConditionalGeneration(config).eval()
    off_init(hf)
    return hf


#: The stage-1 sizes: the vision model and Q-Former above, ITC width 8.
EMBED_DIM = 8


def off_init(model: torch.nn.Module) -> None:
    """Move the queries and every LayerNorm off their initialization (as after training)."""
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def tiny_hf_blip2_retrieval(vocab: int, *, image_size: int = IMAGE_SIZE, seed: int = 0) -> torch.nn.Module:
    """A ``Blip2ForImageTextRetrieval`` (Q-Former text vocabulary ``vocab``), eval mode, off its init."""
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config={"hidden_size": VISION_WIDTH, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": image_size // 2},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 48, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                        "vocab_size": vocab, "max_position_embeddings": 32, "use_qformer_text_input": True},
        num_query_tokens=QUERIES, image_text_hidden_size=EMBED_DIM)
    hf = Blip2ForImageTextRetrieval(config).eval()
    off_init(hf)
    return hf


def hf_retrieval_outputs(model, images, text_ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ITM logits [B, 2], ITC similarities [B_img, B_txt])`` of an HF ``Blip2ForImageTextRetrieval`` (no grad)."""
    with torch.no_grad():
        itm = model(pixel_values=images, input_ids=text_ids, attention_mask=mask, use_image_text_matching_head=True)
        itc = model(pixel_values=images, input_ids=text_ids, attention_mask=mask, use_image_text_matching_head=False)
    return itm.logits_per_image, itc.logits_per_image


def stage1_outputs(model, images, text_ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two of our :class:`vlmcore.blip2.Blip2Stage1`."""
    with torch.no_grad():
        image_embeds = model.image_embeddings(images, None)
        itc = model.similarity(model.image_features(image_embeds), model.text_features(text_ids, mask))
        return model.itm_logits(image_embeds, text_ids, mask), itc


def retrieval_batch(vocab: int, *, image_size: int = IMAGE_SIZE, seed: int = 1):
    """``(pixel_values [3, 3, S, S], text_ids [3, 7] with id 1 first, attention_mask)`` (one padded caption)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, image_size, image_size, generator=generator)
    text = torch.randint(2, vocab, (3, 7), generator=generator)
    text[:, 0] = 1
    mask = torch.ones_like(text)
    mask[1, -3:] = 0
    return images, text, mask


def caption_batch(vocab: int, image_token: int, *, image_size: int = IMAGE_SIZE, seed: int = 1):
    """``(pixel_values [2, 3, S, S], input_ids [2, Q + 6] with Q placeholders first, attention_mask, labels)``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, image_size, image_size, generator=generator)
    words = torch.tensor([i for i in range(3, vocab) if i != image_token])
    text = words[torch.randint(len(words), (2, 6), generator=generator)]
    input_ids = torch.cat([torch.full((2, QUERIES), image_token), text], dim=1)
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0
    labels = input_ids.masked_fill((input_ids == image_token) | (mask == 0), -100)
    return images, input_ids, mask, labels
