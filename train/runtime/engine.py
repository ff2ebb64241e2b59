"""What the DeepSpeed engine is built from: precision, the DeepSpeed config, the optimizer, and how a
skipped step's gradients are dropped."""

from __future__ import annotations

import torch
from vlmcore.train.config import TrainConfig
from vlmcore.train.deepspeed_config import deepspeed_dict
from vlmcore.train.runtime.mixture import backwards_per_micro_batch

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``cfg.precision`` with ``auto`` resolved (bf16 on CUDA, fp32 on CPU); bf16 / fp16 need CUDA."""
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if cfg.precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(f"precision: {cfg.precision} needs a CUDA device (on CPU, training runs in fp32; "
                         "DeepSpeed's fp16 loss scaling is CUDA-only)")
    return cfg.precision


def build_ds_config(cfg: TrainConfig, precision: str) -> dict:
    """The dict handed to ``deepspeed.initialize``: the ``deepspeed`` section plus what the trainer decides."""
    ds = deepspeed_dict(cfg)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.train[0].batch_size
    # Every backward is one of DeepSpeed's micro-steps (several per micro-batch under
    # optim.mixture_backward: per_dataset, or optim.accum_freq = k: each of the k batches of a cached-features
    # step): its boundary is then the step's last backward.
    o = cfg.optim
    ds["gradient_accumulation_steps"] = o.accumulation_steps * o.accum_freq * backwards_per_micro_batch(
        o.mixture, o.mixture_backward, len(cfg.data.train))
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("zero_optimization", {"stage": 0})
    # The trainer's precision decides (auto: bf16 on CUDA, fp32 on CPU), whatever the section says;
    # DeepSpeed reads "bf16" before its old name "bfloat16".
    ds["bf16"] = {**ds.pop("bfloat16", {}), **ds.get("bf16", {}), "enabled": precision == "bf16"}
    # fp16: DeepSpeed's dynamic loss scaling (loss_scale 0) unless the section sets a static scale;
    # its other keys (initial_scale_power, loss_scale_window, hysteresis, min_loss_scale) pass through.
    ds["fp16"] = {"loss_scale": 0, **ds.get("fp16", {}), "enabled": precision == "fp16"}
    if precision != "fp16":
        ds["fp16"] = {"enabled": False}
    return ds


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms, embeddings' 1-D params, scales."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    o = cfg.optim
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=device.type == "cuda")


def promote_scalar_parameters(model: torch.nn.Module) -> list[str]:
    """Reshape 0-dim parameters (CLIP's temperature) to ``[1]``, in place; returns their names.

    DeepSpeed 0.19.8 broadcasts parameters as ``p.data.view(torch.uint8)``, which fails on 0-dim
    tensors. Every vlmcore consumer of such a scalar accepts a one-element tensor.
    """
    names = []
    for name, p in model.named_parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
            names.append(name)
    return names


def discard_gradients(engine) -> None:
    """Drop the gradients of a step that is skipped instead of applied (``engine.step()`` not called).

    The same clearing DeepSpeed does after an update (``engine._take_model_step``): its ZeRO, fp16 and
    bf16 optimizers hold the reduced gradients themselves (and ZeRO-3 restarts its accumulation count
    there); a plain torch optimizer's live in ``param.grad``.
    """
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        engine.optimizer.zero_grad()
    engine.zero_grad()


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """2-norm ``[]`` of the (already all-reduced) gradients of ``params``, left on their device (0 if none)."""
    squares = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
