"""Benchmark of BLIP-2: the Q-Former's image pass and a stage-2 step over a frozen OPT-shaped LM.

Ops:

- ``blip2_qformer``: 32 learned queries through the Q-Former over the frozen image tokens (the
  image side of every stage-1 objective and all of stage 2), forward / backward of the query
  outputs (gradients of every Q-Former parameter; the image tokens are frozen inputs). Providers:
  ``vlmcore`` (:class:`vlmcore.QFormer`, cross-attention on the fused kernel), ``reference`` (the
  same module under ``backend("reference")``), ``hf_sdpa`` / ``hf_eager`` (transformers'
  ``Blip2QFormerModel`` with its SDPA / eager attention), all built from one seed and config.
- ``blip2_stage2``: :class:`vlmcore.Blip2LM` vs HF ``Blip2ForConditionalGeneration`` on the same
  image tokens (the vision tower is outside the timed call, frozen in both) and text: the LM loss
  forward / backward into the bridge (Q-Former, ``language_projection``; the LM frozen).

GPU shapes (``../shared/ANCHORS.md`` section 6): LAVIS stage 1, batch 100, 257 x 1408 EVA ViT-g
tokens, Q-Former 768 x 12 layers x 12 heads, cross-attention every 2nd layer; stage 2, batch 64 over
an OPT-2.7B-shaped LM (2560 x 32 layers), prompt + caption 32 tokens. Tiny shapes on CPU / ``--quick``.

Floors: the matmul FLOPs of the Q-Former's image pass (projections, attention scores and values,
feed-forwards; forward F, backward 2F, both 3F); no byte floor (the rows leave ``gbps`` empty).
"""

from __future__ import annotations

import math

import torch

from vlmcore.blip2 import Blip2LM, QFormer

from .harness import Case, Gate, Provider, RunContext, Unavailable, run_op

OP_QFORMER, OP_STAGE2 = "blip2_qformer", "blip2_stage2"
QFORMER_GPU = dict(batch=100, tokens=257, width=1408, queries=32, hidden=768, layers=12, heads=12,
                   intermediate=3072, freq=2)
QFORMER_QUICK = dict(batch=2, tokens=17, width=32, queries=16, hidden=32, layers=2, heads=2, intermediate=64, freq=2)
STAGE2_GPU = dict(QFORMER_GPU, batch=64, lm_hidden=2560, lm_layers=32, lm_heads=32, lm_ffn=10240, vocab=50272,
                  text=32)
STAGE2_QUICK = dict(QFORMER_QUICK, lm_hidden=32, lm_layers=2, lm_heads=2, lm_ffn=64, vocab=64, text=8)


def qformer_flops(batch, tokens, width, queries, hidden, layers, heads, intermediate, freq, **_) -> dict:
    """Matmul FLOPs of one image pass (forward F; backward taken as 2F, both 3F)."""
    per_layer = (4 * 2 * queries * hidden * hidden  # self-attention q, k, v, out
                 + 2 * 2 * queries * queries * hidden  # scores and values
                 + 2 * 2 * queries * hidden * intermediate)  # query feed-forward
    cross = (2 * 2 * queries * hidden * hidden + 2 * 2 * tokens * width * hidden  # q, out; k, v of the image
             + 2 * 2 * queries * tokens * hidden)
    forward = batch * (layers * per_layer + math.ceil(layers / freq) * cross)
    return {"fwd": float(forward), "bwd": 2.0 * forward, "fwd_bwd": 3.0 * forward}


def _hf_qformer_config(cfg, attn: str):
    from transformers import Blip2QFormerConfig

    config = Blip2QFormerConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                                num_attention_heads=cfg["heads"], intermediate_size=cfg["intermediate"],
                                cross_attention_frequency=cfg["freq"], encoder_hidden_size=cfg["width"],
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = attn
    return config


def _ours(cfg) -> QFormer:
    return QFormer(cfg["width"], hidden_size=cfg["hidden"], num_layers=cfg["layers"], num_heads=cfg["heads"],
                   intermediate_size=cfg["intermediate"], num_query_tokens=cfg["queries"],
                   cross_attention_freq=cfg["freq"], dropout=0.0, attention_dropout=0.0)


def _shape(cfg) -> str:
    return (f"B={cfg['batch']} S={cfg['tokens']}x{cfg['width']} Q={cfg['queries']} D={cfg['hidden']} "
            f"L={cfg['layers']} H={cfg['heads']}")


# ----------------------------------------------------------------------------- Q-Former


def qformer_case(cfg, ctx: RunContext) -> Case:
    def make_inputs():
        generator = torch.Generator(device=ctx.device).manual_seed(cfg["batch"] * cfg["tokens"])
        image = torch.randn(cfg["batch"], cfg["tokens"], cfg["width"], device=ctx.device, generator=generator)
        return {"image_embeds": image.to(ctx.dtype)}

    flops = qformer_flops(**cfg)
    return Case(shape=_shape(cfg), x=cfg["batch"], make_inputs=make_inputs, flops=flops, bytes={},
                meta={"cfg": cfg, "dtype": ctx.dtype, "device": ctx.device})


def _vlmcore_qformer(case, inputs):
    meta = case.meta
    torch.manual_seed(0)
    model = _ours(meta["cfg"]).to(device=meta["device"], dtype=meta["dtype"])
    return lambda: model.encode_image(inputs["image_embeds"])


def _hf_qformer(attn):
    def build(case, inputs):
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

        meta, cfg = case.meta, case.meta["cfg"]
        torch.manual_seed(0)
        model = Blip2QFormerModel(_hf_qformer_config(cfg, attn)).to(device=meta["device"], dtype=meta["dtype"])
        queries = torch.nn.Parameter(torch.randn(1, cfg["queries"], cfg["hidden"], device=meta["device"],
                                                 dtype=meta["dtype"]) * 0.02)
        image = inputs["image_embeds"]

        def fn():
            return model(query_embeds=queries.expand(image.shape[0], -1, -1),
                         encoder_hidden_states=image).last_hidden_state

        return fn

    return build


def _check_transformers(device: torch.device) -> None:
    try:
        import transformers.models.blip_2.modeling_blip_2  # noqa: F401
    except ImportError as error:
        raise Unavailable(f"transformers with BLIP-2 is not installed ({error})") from error


def _check_transformers_sdpa(device: torch.device) -> None:
    """transformers 4.x builds no SDPA Q-Former (it raises at construction): unavailable, not an error."""
    _check_transformers(device)
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    if not getattr(Blip2QFormerModel, "_supports_sdpa", False):
        import transformers

        raise Unavailable(f"transformers {transformers.__version__}'s Blip2QFormerModel has no SDPA attention")


QFORMER_PROVIDERS = [
    Provider("vlmcore", _vlmcore_qformer, backend="triton"),
    Provider("reference", _vlmcore_qformer, backend="reference"),
    Provider("hf_sdpa", _hf_qformer("sdpa"), check=_check_transformers_sdpa),
    Provider("hf_eager", _hf_qformer("eager"), check=_check_transformers),
]


# ----------------------------------------------------------------------------- stage 2


def _blip2_config(cfg):
    from transformers import Blip2Config

    qformer = _hf_qformer_config(cfg, "sdpa").to_dict()
    text = {"model_type": "opt", "vocab_size": cfg["vocab"], "hidden_size": cfg["lm_hidden"],
            "ffn_dim": cfg["lm_ffn"], "num_hidden_layers": cfg["lm_layers"], "num_attention_heads": cfg["lm_heads"],
            "word_embed_proj_dim": cfg["lm_hidden"], "max_position_embeddings": 2048, "dropout": 0.0,
            "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
    vision = {"hidden_size": cfg["width"], "intermediate_size": 2 * cfg["width"], "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=cfg["queries"], image_token_index=cfg["vocab"] - 1)


def stage2_case(cfg, ctx: RunContext) -> Case:
    def make_inputs():
        generator = torch.Generator(device=ctx.device).manual_seed(7)
        image = torch.randn(cfg["batch"], cfg["tokens"], cfg["width"], device=ctx.device, generator=generator)
        text = torch.randint(3, cfg["vocab"] - 1, (cfg["batch"], cfg["text"]), device=ctx.device, generator=generator)
        return {"image_embeds": image.to(ctx.dtype), "text": text}

    flops = qformer_flops(**cfg)
    shape = f"{_shape(cfg)} LM={cfg['lm_hidden']}x{cfg['lm_layers']} T={cfg['text']}"
    return Case(shape=shape, x=cfg["batch"], make_inputs=make_inputs, flops=flops, bytes={},
                meta={"cfg": cfg, "dtype": ctx.dtype, "device": ctx.device})


def _hf_blip2(case):
    from transformers.models.blip_2.modeling_blip_2 import Blip2ForConditionalGeneration

    meta = case.meta
    torch.manual_seed(0)
    with torch.device(meta["device"]):
        model = Blip2ForConditionalGeneration(_blip2_config(meta["cfg"]))
    model = model.to(dtype=meta["dtype"])
    model.vision_model.requires_grad_(False)
    model.language_model.requires_grad_(False)
    return model


def _stage2_labels(text):
    """Caption labels: the first 4 tokens are the prompt (-100)."""
    labels = text.clone()
    labels[:, :4] = -100
    return labels


def _vlmcore_stage2(case, inputs):
    hf = _hf_blip2(case)  # same LM weights and init as the HF provider
    cfg = case.meta["cfg"]
    qformer = _ours(cfg).to(device=case.meta["device"], dtype=case.meta["dtype"])
    model = Blip2LM(qformer, hf.language_model)
    model.load_hf_state_dict(hf.state_dict(), strict=False)
    text, labels = inputs["text"], _stage2_labels(inputs["text"])
    return lambda: model(None, text, labels=labels, image_embeds=inputs["image_embeds"]).loss


def _hf_stage2(case, inputs):
    model = _hf_blip2(case)
    cfg = case.meta["cfg"]
    text = inputs["text"]
    image_tokens = torch.full((text.shape[0], cfg["queries"]), cfg["vocab"] - 1, device=text.device)
    input_ids = torch.cat([image_tokens, text], dim=1)
    labels = torch.cat([torch.full_like(image_tokens, -100), _stage2_labels(text)], dim=1)
    image = inputs["image_embeds"]
    queries = model.query_tokens

    def fn():  # HF's forward from the image tokens on (its vision tower is frozen and outside the timed call)
        query_out = model.qformer(query_embeds=queries.expand(image.shape[0], -1, -1),
                                  encoder_hidden_states=image).last_hidden_state
        embeds = model.get_input_embeddings()(input_ids)
        mask = (input_ids == cfg["vocab"] - 1)[..., None]
        embeds = embeds.masked_scatter(mask, model.language_projection(query_out).to(embeds.dtype))
        return model.language_model(inputs_embeds=embeds, labels=labels).loss

    return fn


STAGE2_PROVIDERS = [
    Provider("vlmcore", _vlmcore_stage2, backend="triton", check=_check_transformers),
    Provider("hf", _hf_stage2, check=_check_transformers),
]


def run(ctx: RunContext) -> None:
    """Gated in the run's dtype: the Q-Former against the reference backend, stage 2 against HF's
    model with the same weights."""
    run_op(OP_QFORMER, [qformer_case(QFORMER_QUICK if ctx.quick else QFORMER_GPU, ctx)], QFORMER_PROVIDERS, ctx,
           gate=Gate(QFORMER_PROVIDERS[1], upcast=False))
    run_op(OP_STAGE2, [stage2_case(STAGE2_QUICK if ctx.quick else STAGE2_GPU, ctx)], STAGE2_PROVIDERS, ctx,
           gate=Gate(STAGE2_PROVIDERS[1], upcast=False))
