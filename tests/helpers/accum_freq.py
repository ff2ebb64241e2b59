"""Shared by tests/train/test_accum_freq.py and its 2-rank worker: tiny CLIP / SigLIP models (optionally
with dropout), their tasks, micro-batches, and the gradients of the feature-cache scheme against those of
one big batch."""

from __future__ import annotations

import torch
from torch import nn
from vlmcore.train.runtime import feature_cache
from vlmcore.train.tasks.clip import ClipConfig, ClipTask
from vlmcore.train.tasks.siglip import SiglipConfig, SiglipTask

from helpers.tiny_clip import WORDS, tiny_clip, tokenizer

IMAGE = 16  # tiny_clip's image size
CPU = torch.device("cpu")


class DropoutTower(nn.Module):
    """A vision tower with dropout: ``[n, 3, 16, 16] -> [n, width]`` (the built-in towers have none)."""

    def __init__(self, width: int = 24, p: float = 0.3):
        super().__init__()
        self.width = width
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE * IMAGE, width), nn.GELU(), nn.Dropout(p),
                                 nn.Linear(width, width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def model_and_task(loss: str, *, dropout: bool = False, dist_impl: str = "gather", seed: int = 0):
    """``(model in train mode, task)``; ``loss``: ``"clip"`` or ``"siglip"``."""
    torch.manual_seed(seed)
    tower = {"vision_encoder": DropoutTower()} if dropout else {}
    if loss == "clip":
        model, task_cls, config = tiny_clip(**tower), ClipTask, ClipConfig()
    else:
        model = tiny_clip(loss="siglip", siglip_dist_impl="ring" if dist_impl == "ring" else "gather", **tower)
        task_cls, config = SiglipTask, SiglipConfig(dist_impl=dist_impl)
    task = task_cls.__new__(task_cls)  # features / loss_from_features need the section only
    task.config = config
    return model.train(), task


def micro_batches(k: int, b: int, seed: int) -> list[dict]:
    """k batches of b pairs ``{"images": [b, 3, 16, 16], "tokens": [b, 8]}``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        words = torch.randint(0, len(WORDS), (b, 3), generator=gen).tolist()
        out.append({"images": torch.randn(b, 3, IMAGE, IMAGE, generator=gen),
                    "tokens": tokenizer([" ".join(WORDS[i] for i in row) for row in words])})
    return out


def concat(batches: list[dict]) -> dict:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (a copy), then the gradients cleared."""
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def scheme(task, model, batches: list[dict], group=None, *, criterion_grad_in_every_pass: bool = False):
    """``(loss, metrics, gradients)`` of the feature-cache scheme over ``batches`` (plain backward).

    ``criterion_grad_in_every_pass``: OpenCLIP's loop, which gives the loss's own parameters a gradient
    in each of the k passes (the failure mode the scheme avoids)."""
    def loss_fn(features, criterion_grad):
        return task.loss_from_features(model, features, group,
                                       criterion_grad=criterion_grad or criterion_grad_in_every_pass)

    loss, metrics = feature_cache.accumulate(lambda batch: task.features(model, batch, CPU), loss_fn, batches,
                                             lambda loss, j: loss.backward(), CPU)
    return loss, metrics, gradients(model)


def big_batch(task, model, batches: list[dict], group=None):
    """``(loss, metrics, gradients)`` of the task's plain loss on the k batches concatenated."""
    loss, metrics = task.loss(model, concat(batches), CPU, group)
    loss.backward()
    return loss.detach(), metrics, gradients(model)


def micro_forwards(task, model, batches: list[dict], group=None):
    """``(loss, metrics, gradients)`` of one graph over the k batches' forwards (with grad, in turn, as
    the scheme's first pass draws their dropout) and the loss of all their rows: the k x b batch whose
    random ops drew what the scheme's did."""
    parts = [task.features(model, batch, CPU) for batch in batches]
    features = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    loss, metrics = task.loss_from_features(model, features, group)
    loss.backward()
    return loss.detach(), metrics, gradients(model)
