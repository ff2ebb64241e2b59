"""Random state dicts named as salesforce/BLIP's original checkpoints (ViT, MED encoder/decoder, heads)."""

from __future__ import annotations

import torch

VOCAB, BOS, SEP, PAD = 64, 60, 2, 0
V_WIDTH, V_DEPTH, V_MLP, IMAGE, PATCH = 48, 2, 96, 32, 8
T_WIDTH, T_DEPTH, T_MLP, T_POS = 32, 2, 64, 24
EMBED, QUEUE = 24, 10


def salesforce_vit(prefix: str, image_size: int = IMAGE) -> dict[str, tuple]:
    """models/vit.py VisionTransformer (no head): PatchEmbed, cls_token, pos_embed, Blocks, norm."""
    d, grid = V_WIDTH, image_size // PATCH
    names = {f"{prefix}cls_token": (1, 1, d), f"{prefix}pos_embed": (1, 1 + grid * grid, d),
             f"{prefix}patch_embed.proj.weight": (d, 3, PATCH, PATCH), f"{prefix}patch_embed.proj.bias": (d,),
             f"{prefix}norm.weight": (d,), f"{prefix}norm.bias": (d,)}
    for i in range(V_DEPTH):
        block = f"{prefix}blocks.{i}."
        names.update({f"{block}norm1.weight": (d,), f"{block}norm1.bias": (d,),
                      f"{block}attn.qkv.weight": (3 * d, d), f"{block}attn.qkv.bias": (3 * d,),
                      f"{block}attn.proj.weight": (d, d), f"{block}attn.proj.bias": (d,),
                      f"{block}norm2.weight": (d,), f"{block}norm2.bias": (d,),
                      f"{block}mlp.fc1.weight": (V_MLP, d), f"{block}mlp.fc1.bias": (V_MLP,),
                      f"{block}mlp.fc2.weight": (d, V_MLP), f"{block}mlp.fc2.bias": (d,)})
    return names


def salesforce_bert(prefix: str) -> dict[str, tuple]:
    """models/med.py BertModel(add_pooling_layer=False) with add_cross_attention (encoder_width = ViT width)."""
    h = T_WIDTH
    names = {f"{prefix}embeddings.position_ids": (1, T_POS), f"{prefix}embeddings.word_embeddings.weight": (VOCAB, h),
             f"{prefix}embeddings.position_embeddings.weight": (T_POS, h),
             f"{prefix}embeddings.LayerNorm.weight": (h,), f"{prefix}embeddings.LayerNorm.bias": (h,)}
    for i in range(T_DEPTH):
        layer = f"{prefix}encoder.layer.{i}."
        for block, width_in in (("attention", h), ("crossattention", V_WIDTH)):
            names.update({f"{layer}{block}.self.query.weight": (h, h), f"{layer}{block}.self.query.bias": (h,),
                          f"{layer}{block}.self.key.weight": (h, width_in), f"{layer}{block}.self.key.bias": (h,),
                          f"{layer}{block}.self.value.weight": (h, width_in), f"{layer}{block}.self.value.bias": (h,),
                          f"{layer}{block}.output.dense.weight": (h, h), f"{layer}{block}.output.dense.bias": (h,),
                          f"{layer}{block}.output.LayerNorm.weight": (h,),
                          f"{layer}{block}.output.LayerNorm.bias": (h,)})
        names.update({f"{layer}intermediate.dense.weight": (T_MLP, h),
                      f"{layer}intermediate.dense.bias": (T_MLP,),
                      f"{layer}output.dense.weight": (h, T_MLP), f"{layer}output.dense.bias": (h,),
                      f"{layer}output.LayerNorm.weight": (h,), f"{layer}output.LayerNorm.bias": (h,)})
    return names


def salesforce_lm_head() -> dict[str, tuple]:
    """models/med.py BertLMHeadModel.cls (BertOnlyMLMHead); decoder.bias is predictions.bias."""
    p = "text_decoder.cls.predictions."
    return {f"{p}bias": (VOCAB,), f"{p}transform.dense.weight": (T_WIDTH, T_WIDTH),
            f"{p}transform.dense.bias": (T_WIDTH,),
            f"{p}transform.LayerNorm.weight": (T_WIDTH,), f"{p}transform.LayerNorm.bias": (T_WIDTH,),
            f"{p}decoder.weight": (VOCAB, T_WIDTH), f"{p}decoder.bias": (VOCAB,)}


def salesforce_heads(suffix: str = "") -> dict[str, tuple]:
    return {f"vision_proj{suffix}.weight": (EMBED, V_WIDTH), f"vision_proj{suffix}.bias": (EMBED,),
            f"text_proj{suffix}.weight": (EMBED, T_WIDTH), f"text_proj{suffix}.bias": (EMBED,)}


def salesforce_state_dict(kind: str, seed: int = 0, image_size: int = IMAGE) -> dict[str, torch.Tensor]:
    """Random weights under the names of ``BLIP_Pretrain`` ("pretrain", model_base.pth), ``BLIP_Retrieval``
    ("retrieval", model_base_retrieval_coco.pth) or ``BLIP_Decoder`` ("caption"), with BLIP's ties."""
    shapes = salesforce_vit("visual_encoder.", image_size)
    if kind in ("pretrain", "retrieval"):
        shapes.update(salesforce_bert("text_encoder."))
        shapes.update(salesforce_heads())
        shapes.update({"itm_head.weight": (2, T_WIDTH), "itm_head.bias": (2,), "temp": ()})
        shapes.update(salesforce_vit("visual_encoder_m.", image_size))
        shapes.update(salesforce_bert("text_encoder_m."))
        shapes.update(salesforce_heads("_m"))
        shapes.update({"image_queue": (EMBED, QUEUE), "text_queue": (EMBED, QUEUE)})
    if kind in ("pretrain", "caption"):
        shapes.update(salesforce_bert("text_decoder.bert."))
        shapes.update(salesforce_lm_head())
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[1]).expand(shape).clone()
        elif "norm" in name.lower() and name.endswith("weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.2 * torch.randn(shape, generator=g)
    if "temp" in state:
        state["temp"] = torch.tensor(0.05)
    if kind == "retrieval":
        state["idx_queue"] = torch.randint(0, 5, (1, QUEUE), generator=g)
        state["ptr_queue"] = torch.tensor([3])
    if kind == "pretrain":
        state["queue_ptr"] = torch.tensor([4])
        for name in list(state):  # tie_encoder_decoder_weights(text_encoder, text_decoder.bert, '', '/attention')
            if name.startswith("text_decoder.bert.") and ".attention." not in name:
                state[name] = state["text_encoder." + name[len("text_decoder.bert."):]]
    if "text_decoder.cls.predictions.bias" in state:  # BertLMPredictionHead ties; the LM decoder = word embeddings
        state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
        word_embeddings = state["text_decoder.bert.embeddings.word_embeddings.weight"]
        state["text_decoder.cls.predictions.decoder.weight"] = word_embeddings
    return state
