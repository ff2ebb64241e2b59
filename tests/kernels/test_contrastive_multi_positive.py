"""Multi-positive contrastive loss (group ids, several captions per image): the Triton path against
the materialized reference ``contrastive_loss_multi_positive_reference``, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close, tolerance
from vlmcore.kernels import backend, contrastive_loss
from vlmcore.kernels.reference import contrastive_loss_multi_positive_reference, contrastive_loss_reference

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _case(n, d, dtype, device, groups, seed=0):
    """n images in ``groups`` groups (ids shuffled; every group on both sides), captions likewise."""
    generator = torch.Generator().manual_seed(seed)
    image_ids = torch.arange(n) % groups
    text_ids = image_ids[torch.randperm(n, generator=generator)]
    image = F.normalize(torch.randn(n, d, generator=generator), dim=1)
    text = F.normalize(image[torch.argsort(text_ids, stable=True)] + torch.randn(n, d, generator=generator),
                       dim=1)
    return (image.to(device, dtype), text.to(device, dtype), (image_ids * 7 - 3).to(device),
            (text_ids * 7 - 3).to(device))


def _grads(fn, image, text, scale):
    leaves = [image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_(),
              scale.detach().clone().requires_grad_()]
    loss = fn(*leaves)
    loss.backward()
    return loss, [leaf.grad for leaf in leaves]


def _compare(got, ref, dtype):
    assert_close(got[0], ref[0], dtype=dtype, name="loss")
    atol, rtol = tolerance(dtype, grad=True)
    for name, g, r in zip(("d_image", "d_text", "d_logit_scale"), got[1], ref[1]):
        assert g.dtype == (dtype if name != "d_logit_scale" else torch.float32)
        assert_close(g, r, atol=atol * max(float(r.abs().max()), 1e-2), rtol=rtol, dtype=dtype, name=name)


@pytest.mark.parametrize("n,d,groups,path", [(37, 16, 10, "register"), (130, 96, 40, "window")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_reference(n, d, groups, path, dtype, smoothing, monkeypatch, device, nan_poisoned_empty):
    import vlmcore.kernels.contrastive as module

    real_choose = module._choose
    monkeypatch.setattr(module, "_choose", lambda *a, **k: real_choose(*a, **{**k, "backward": path}))
    image, text, image_ids, text_ids = _case(n, d, dtype, device, groups)
    scale = torch.tensor(20.0, device=device)
    with backend("triton"):
        got = _grads(lambda i, t, s: contrastive_loss(i, t, s, label_smoothing=smoothing, image_ids=image_ids,
                                                      text_ids=text_ids), image, text, scale)
    ref = _grads(lambda i, t, s: contrastive_loss_multi_positive_reference(
        i, t, s, image_ids, text_ids, label_smoothing=smoothing), image.float(), text.float(), scale)
    _compare(got, ref, dtype)


def test_unique_ids_equal_the_plain_loss(device, nan_poisoned_empty):
    image, text, _, _ = _case(50, 32, torch.float32, device, 50)
    ids = torch.randperm(50).to(device)
    scale = torch.tensor(15.0, device=device)
    with backend("triton"):
        got = _grads(lambda i, t, s: contrastive_loss(i, t, s, label_smoothing=0.1, image_ids=ids, text_ids=ids),
                     image, text, scale)
        plain = _grads(lambda i, t, s: contrastive_loss(i, t, s, label_smoothing=0.1), image, text, scale)
    _compare(got, plain, torch.float32)
    ref = contrastive_loss_multi_positive_reference(image, text, scale, ids, ids, label_smoothing=0.1)
    assert_close(ref, contrastive_loss_reference(image, text, scale, label_smoothing=0.1), name="reference")


def test_bit_identical_reruns(device, nan_poisoned_empty):
    image, text, image_ids, text_ids = _case(70, 64, torch.float16, device, 20)
    scale = torch.tensor(30.0, device=device)

    def run():
        with backend("triton"):
            return _grads(lambda i, t, s: contrastive_loss(i, t, s, image_ids=image_ids, text_ids=text_ids),
                          image, text, scale)

    first, second = run(), run()
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_bad_group_ids_name_the_argument(backend_name, device):
    image, text, image_ids, text_ids = _case(8, 16, torch.float32, device, 4)
    s = torch.tensor(10.0, device=device)
    cases = [
        ({"image_ids": image_ids}, ValueError, "text_ids must be given"),
        ({"image_ids": image_ids[:5], "text_ids": text_ids}, ValueError, "image_ids must have shape"),
        ({"image_ids": image_ids.float(), "text_ids": text_ids}, TypeError, "image_ids must be an integer"),
        ({"image_ids": image_ids, "text_ids": [0] * 8}, TypeError, "text_ids must be an integer"),
        ({"image_ids": image_ids, "text_ids": text_ids, "output_dict": True}, ValueError, "output_dict"),
        ({"image_ids": image_ids, "text_ids": text_ids, "group": object(), "local_loss": True}, ValueError,
         "local_loss"),
        ({"image_ids": image_ids, "text_ids": text_ids, "group": object()}, TypeError, "group must be a"),
        ({"image_ids": image_ids, "text_ids": text_ids + 100}, ValueError, "image_ids needs|positive"),
    ]
    with backend(backend_name):
        for kwargs, error, match in cases:
            if device.type == "cuda" and "positive" in match:
                continue  # no host sync on a GPU: a row without positives gives NaN (below)
            with pytest.raises(error, match=match):
                contrastive_loss(image, text, s, **kwargs)


@pytest.mark.gpu
def test_gpu_row_without_positive_gives_nan():
    image, text, image_ids, text_ids = _case(256, 64, torch.bfloat16, "cuda", 16)
    loss = contrastive_loss(image, text, torch.tensor(10.0, device="cuda"), image_ids=image_ids,
                            text_ids=text_ids + 1000)
    assert torch.isnan(loss)
