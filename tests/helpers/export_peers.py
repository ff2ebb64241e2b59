"""The peers' own models for the export tests: OpenFlamingo's ``Flamingo`` on a tiny LM and open_clip tower.

OpenFlamingo 2.0.1 is installed ``--no-deps``; its ``helpers.py`` imports ``einops_exts`` for one
function, ``rearrange_many`` (``einops.rearrange`` applied to each tensor). When the package is not
installed, :func:`openflamingo_model` registers that one function (over the real ``einops``) under
its name for the duration of the test, so every number still comes from OpenFlamingo's code.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import torch

#: The open_clip tower of the export tests (tiny ViT-B-32 shape; 16 px images, 4 patch tokens of width 32).
OPEN_CLIP_KWARGS = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8,
                                                    "head_width": 16},
                    "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1}}


def _einops_exts(monkeypatch) -> None:
    if importlib.util.find_spec("einops_exts") is not None:
        return
    import einops

    module = types.ModuleType("einops_exts")
    module.rearrange_many = lambda tensors, pattern, **sizes: [einops.rearrange(t, pattern, **sizes) for t in tensors]
    monkeypatch.setitem(sys.modules, "einops_exts", module)


def openflamingo_model(monkeypatch, lm_config, *, media_token_id: int, eoc_token_id: int,
                       cross_attn_every_n_layers: int = 1) -> torch.nn.Module:
    """OpenFlamingo's ``Flamingo`` as ``create_model_and_transforms`` assembles it (open_clip tower of
    :data:`OPEN_CLIP_KWARGS` with ``output_tokens``, the LM of ``lm_config`` extended by
    ``FlamingoLMMixin``), random weights, eval mode."""
    _einops_exts(monkeypatch)
    import open_clip
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import AutoModelForCausalLM

    vision = open_clip.create_model("ViT-B-32", **OPEN_CLIP_KWARGS)
    vision.visual.output_tokens = True
    lm = AutoModelForCausalLM.from_config(lm_config)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    model = Flamingo(vision, lm, eoc_token_id, media_token_id, vis_dim=OPEN_CLIP_KWARGS["vision_cfg"]["width"],
                     cross_attn_every_n_layers=cross_attn_every_n_layers)
    return model.eval()


#: model.lm / model.flamingo of the tiny Flamingo runs: a Llama LM and OpenFlamingo's fixed bridge sizes.
FLAMINGO_LM = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
FLAMINGO_SIZES = {"num_latents": 64, "resampler_depth": 6, "dim_head": 64, "heads": 8, "ff_mult": 4}


def flamingo_overrides(data) -> list[str]:
    """vlmcore-train overrides after ``train_argv("flamingo", ...)``: pairs only, the open_clip tower, the tiny LM."""
    pairs = {"kind": "pairs", "shards": f"{data}/train-*.tar", "batch_size": 4, "shuffle_buffer": 0}
    vision = {"type": "open_clip", "name": "ViT-B-32", "model_kwargs": OPEN_CLIP_KWARGS, "freeze": True}
    return [f"data.train=[{json.dumps(pairs)}]", f"model.vision={json.dumps(vision)}",
            f"model.lm={{config: {json.dumps(FLAMINGO_LM)}}}", f"model.flamingo={json.dumps(FLAMINGO_SIZES)}"]


def trained_looking(module: torch.nn.Module, names, seed: int = 0) -> None:
    """Overwrite the parameters ``names`` of ``module`` with random values (gates 0.5), as after training."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in names:
            p = params[name]
            if name.endswith("_gate"):
                p.fill_(0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if name.endswith("norm.weight") else 0))


def openflamingo_training_checkpoint(model, path) -> dict:
    """Save ``model`` as OpenFlamingo's training does: ``{"model_state_dict": trainable part, "module."-prefixed}``
    (the resampler, both copies of each gated block, the LM input embedding); returns that state."""
    from vlmcore.flamingo_convert import openflamingo_state_dict

    state = {f"module.{k}": v for k, v in openflamingo_state_dict(model).items()
             if "perceiver." in k or "gated_cross_attn" in k or "embed_tokens" in k}
    torch.save({"model_state_dict": state, "epoch": 0}, path)
    return state
