"""vlmcore.ContrastiveLoss: CLIP's learnable temperature on the fused op (on the ``device`` fixture:
CUDA when present, else CPU with the kernels in the Triton interpreter)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close
from vlmcore.kernels import backend

import vlmcore


def _features(device, n=12, d=32):
    image = F.normalize(torch.randn(n, d, device=device), dim=1)
    return image, F.normalize(image + 0.5 * torch.randn(n, d, device=device), dim=1)


def _step(module, image, text, backend_name, **kwargs):
    """``(output, d_image, d_text, d_theta)`` of one forward + backward."""
    module.zero_grad()
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    with backend(backend_name):
        out = module(image, text, **kwargs)
    (out["loss"] if isinstance(out, dict) else out).backward()
    return out, image.grad, text.grad, module.logit_scale.grad.clone()


def test_init_is_clip_temperature():
    module = vlmcore.ContrastiveLoss()
    assert module.logit_scale.requires_grad
    assert math.isclose(float(module.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(float(module.scale().detach()), 1 / 0.07, rel_tol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_triton_matches_reference_with_theta_gradient(label_smoothing, device, nan_poisoned_empty):
    image, text = _features(device)
    module = vlmcore.ContrastiveLoss(label_smoothing=label_smoothing).to(device)
    got = _step(module, image, text, "triton", output_dict=True)
    ref = _step(module, image, text, "reference", output_dict=True)
    assert_close(got[0]["loss"], ref[0]["loss"], name="loss")
    assert_close(got[0]["logit_scale"], torch.tensor(1 / 0.07, device=device), name="logit_scale")
    for key in ("i2t_acc", "t2i_acc"):
        assert float(got[0][key]) == float(ref[0][key]), key
    for name, g, r in zip(("d_image", "d_text", "d_theta"), got[1:], ref[1:]):
        assert_close(g, r, grad=True, name=name)
    # theta's gradient is the logit-scale gradient times exp(theta) (below the clamp)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    with backend("reference"):
        vlmcore.kernels.contrastive_loss(image, text, scale, label_smoothing=label_smoothing).backward()
    assert_close(got[3], scale.grad * (1 / 0.07), grad=True, name="d_theta = d_s * s")
    assert float(got[3].abs()) > 0


def test_scale_clamps_at_100_and_stops_the_gradient(device):
    image, text = _features(device)
    module = vlmcore.ContrastiveLoss().to(device)
    with torch.no_grad():
        module.logit_scale.fill_(math.log(250.0))
    assert float(module.scale().detach()) == 100.0
    got = _step(module, image, text, "triton")
    assert float(got[3]) == 0.0
    clamped = torch.tensor(100.0, device=device)
    with backend("reference"):
        expected = vlmcore.kernels.contrastive_loss(image, text, clamped)
    assert_close(got[0], expected, name="loss at s = 100")


def test_bad_arguments():
    with pytest.raises(ValueError, match="init_temperature"):
        vlmcore.ContrastiveLoss(init_temperature=0.0)
    with pytest.raises(ValueError, match="max_scale"):
        vlmcore.ContrastiveLoss(max_scale=-1.0)
