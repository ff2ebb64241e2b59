"""Report every autotuner of vlmcore.kernels as CUDA builds it, and whether each preferred config
survives its kernel's own pruner at every key the launchers use. No GPU needed.

Run as a script with ``TRITON_INTERPRET=0`` (so the op modules build their CUDA spaces, not the
interpreter's one config) and ``VLMCORE_AUTOTUNE`` as the caller sets it
(tests/kernels/test_autotune.py). Prints one JSON object:
``{"autotuners": [{"module", "name", "kernel", "configs"}], "pruned_away": [...]}``; ``pruned_away``
lists (kernel, key) cases where the preferred config is NOT among the configs the pruner keeps.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402

MODULES = ("contrastive", "sigmoid_contrastive", "momentum_contrastive", "masked_cross_attention",
           "resampler_attention")


def autotuners() -> list[dict]:
    """Every ``triton.autotune`` object at a module's top level or inside a top-level dict."""
    found = []
    for module_name in MODULES:
        module = importlib.import_module(f"vlmcore.kernels.{module_name}")
        for name, value in vars(module).items():
            values = value.items() if isinstance(value, dict) else [(None, value)]
            for key, item in values:
                if isinstance(item, triton.runtime.Autotuner):
                    found.append({"module": module_name, "name": name if key is None else f"{name}[{key}]",
                                  "kernel": item.base_fn.__name__, "configs": len(item.configs)})
    return found


def _contrastive_cases():
    module = importlib.import_module("vlmcore.kernels.contrastive")
    for precision in ("tf32", "ieee"):
        for d in (16, 96, 768, 4096):
            for row_tile in (64, 128):
                for accuracy in (False, True):
                    named = {"d": d, "row_tile": row_tile, "ACCURACY": accuracy, "PRECISION": precision}
                    yield "fwd", module._fwd_tuned[precision], module._fwd_configs(precision), module._prune, named, {}
            for name in ("bwd_rows", "bwd_cols", "window"):
                tuned = getattr(module, f"_{name}_tuned")[precision]
                space = module._window_configs() if name == "window" else module._bwd_configs(precision)
                yield name, tuned, space, module._prune, {"d": d, "PRECISION": precision}, {}
            yield ("matmul", module._matmul_tuned[precision], module._matmul_configs(precision), module._prune_matmul,
                   {"K": d, "PRECISION": precision}, {})


def _momentum_cases():
    module = importlib.import_module("vlmcore.kernels.momentum_contrastive")
    for block_e in (16, 32, 64, 128, 256):
        for has_ids in (False, True):
            for name, prune in (("fwd", module._prune), ("bwd", module._prune_backward)):
                tuned = getattr(module, f"_momentum_distill_{name}_kernel")
                yield name, tuned, module._cuda_configs(), prune, {}, dict(BLOCK_E=block_e, HAS_IDS=has_ids)


def _masked_cases():
    module = importlib.import_module("vlmcore.kernels.masked_cross_attention")
    for name in ("fwd", "dq", "kv"):
        tuned = getattr(module, f"_{name}_kernel")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for head_dim in (16, 32, 64, 96, 128):
                for tokens in (1, 16, 64, 256):
                    one_pass = name == "kv" and module._one_pass("immediate", tokens, module._kv_kernel.configs)
                    yield (name, tuned, module._CUDA_CONFIGS[name], tuned.early_config_prune,
                           {"q_ptr": torch.empty(0, dtype=dtype), "R": tokens},
                           dict(BLOCK_D=module._block_d(head_dim), ONE_PASS=one_pass))


def _resampler_cases():
    module = importlib.import_module("vlmcore.kernels.resampler_attention")
    for name, tuned in (("fwd", module._resampler_fwd_kernel), ("dq", module._resampler_bwd_dq_kernel),
                        ("dkdv", module._resampler_bwd_dkdv_kernel), ("fused", module._resampler_bwd_fused_kernel)):
        for head_dim in (16, 32, 64, 96, 128):
            # key counts of the models: S >= 64 media tokens (a 224 px ViT gives 257), R = 32 or 64
            for media, queries, latents in ((64, 32, False), (257, 32, False), (64, 64, True), (257, 64, True)):
                yield (name, tuned, module._cuda_key_block_configs(),
                       tuned.early_config_prune, {"num_media": media, "num_queries": queries},
                       dict(BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_LATENTS=latents))


def pruned_away() -> list[dict]:
    """The (kernel, key) cases where the autotuner's one config (``preferred`` mode) is not among the
    configs the kernel's pruner keeps from the whole CUDA space."""
    missing = []
    for cases in (_contrastive_cases(), _momentum_cases(), _masked_cases(), _resampler_cases()):
        for name, tuned, space, prune, named, kwargs in cases:
            preferred = tuned.configs[0] if len(tuned.configs) == 1 else None
            if preferred is None or preferred not in prune(space, named, **kwargs):
                missing.append({"kernel": name, "named": {k: str(v) for k, v in named.items()}, "kwargs": kwargs})
    return missing


if __name__ == "__main__":
    report = {"autotuners": autotuners()}
    if os.environ.get("VLMCORE_AUTOTUNE") == "preferred":
        report["pruned_away"] = pruned_away()
    print(json.dumps(report))
    sys.exit(0)
