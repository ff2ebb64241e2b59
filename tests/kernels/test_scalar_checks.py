"""The ops' one policy for scalar tensors (kernels/_checks.py): a device scalar (logit scale, bias,
temperature) is never read to the host on the eager path, a CPU one is still checked.

A host read of a GPU tensor (``.item()``, ``float()``, ``bool()``, ``int()``, ``.tolist()``) stalls the
stream every step and makes the op impossible to capture in a CUDA graph. Without a GPU the eager
path is run on the ``meta`` device (any device but the CPU takes the same branches) with those
``Tensor`` methods replaced by ones that fail on a non-CPU tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vlmcore.kernels import (
    contrastive_loss,
    masked_cross_attention,
    momentum_contrastive_loss,
    resampler_attention,
    sigmoid_contrastive_loss,
)

HOST_READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__")


@pytest.fixture
def no_host_reads_of_device_tensors(monkeypatch):
    """Every host read of a tensor that is not on the CPU raises AssertionError naming the method."""
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def guarded(self, *args, _real=real, _name=name, **kwargs):
            if self.device.type != "cpu":
                raise AssertionError(f"host read: Tensor.{_name} of a {self.device.type} tensor {tuple(self.shape)}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)


def _leaf(*shape, value: float | None = None) -> torch.Tensor:
    tensor = torch.full(shape, value, device="meta") if value is not None else torch.empty(shape, device="meta")
    return tensor.requires_grad_()


def test_the_guard_catches_a_host_read(no_host_reads_of_device_tensors):
    with pytest.raises(AssertionError, match="Tensor.__float__ of a meta tensor"):
        float(torch.zeros((), device="meta"))
    assert float(torch.ones(())) == 1.0  # CPU tensors are still read


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("negatives_only", [False, True])
def test_sigmoid_loss_reads_no_device_scalar(with_ids, negatives_only, no_host_reads_of_device_tensors):
    if with_ids and negatives_only:
        pytest.skip("negatives_only takes no group ids")
    image, text, scale, bias = _leaf(6, 16), _leaf(6, 16), _leaf(value=10.0), _leaf(value=-10.0)
    ids = dict(image_group_ids=torch.arange(6, device="meta"), text_group_ids=torch.arange(6, device="meta"))
    loss = sigmoid_contrastive_loss(image, text, scale, bias, negatives_only=negatives_only,
                                    **(ids if with_ids else {}))
    loss.backward()
    assert loss.device.type == "meta" and scale.grad is not None and bias.grad is not None


@pytest.mark.parametrize("kwargs", [{}, {"output_dict": True, "label_smoothing": 0.1},
                                    {"image_ids": "ids", "text_ids": "ids"}])
def test_contrastive_loss_reads_no_device_scalar(kwargs, no_host_reads_of_device_tensors):
    image, text, scale = _leaf(6, 16), _leaf(6, 16), _leaf(value=14.3)
    ids = torch.tensor([0, 1, 1, 2, 3, 3], device="meta")
    kwargs = {k: ids if v == "ids" else v for k, v in kwargs.items()}
    out = contrastive_loss(image, text, scale, **kwargs)
    (out["loss"] if isinstance(out, dict) else out).backward()
    assert scale.grad is not None


def test_momentum_loss_reads_no_device_scalar(no_host_reads_of_device_tensors):
    image, text, temp = _leaf(4, 16), _leaf(4, 16), _leaf(value=0.07)
    image_m, text_m, queue = (torch.empty(n, 16, device="meta") for n in (4, 4, 9))
    ids, queue_ids = torch.arange(4, device="meta"), torch.arange(9, device="meta")
    momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, image_queue=queue, text_queue=queue,
                              ids=ids, queue_ids=queue_ids).backward()
    assert temp.grad is not None


def test_attention_ops_read_nothing_of_the_device(no_host_reads_of_device_tensors):
    q, k, v = _leaf(2, 8, 2, 16), _leaf(2, 6, 2, 16), _leaf(2, 6, 2, 16)
    media_index = torch.zeros(2, 8, dtype=torch.long, device="meta")
    masked_cross_attention(q, k, v, media_index, 3, mode="all_previous").sum().backward()
    latents = _leaf(2, 4, 2, 16)
    resampler_attention(latents, k, v, k_latents=latents, v_latents=latents).sum().backward()
    assert q.grad is not None and latents.grad is not None


def test_cpu_scalars_are_still_checked():
    image, text = (F.normalize(torch.randn(4, 8), dim=1) for _ in range(2))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        contrastive_loss(image, text, torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        sigmoid_contrastive_loss(image, text, torch.tensor(10.0), torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="logit_scale is on meta but image_features is on cpu"):
        sigmoid_contrastive_loss(image, text, torch.tensor(10.0, device="meta"), torch.tensor(0.0))
