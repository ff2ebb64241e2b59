"""vlmcore.SigLIPLoss and CLIP(loss="siglip"): initialization, loss and gradients vs the reference,
zero-shot scores (sigmoid, same ranking as CLIP's logits), bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close
from helpers.tiny_clip import CLASSES, tiny_clip, tokenizer
from vlmcore.kernels import backend
from vlmcore.kernels.reference import sigmoid_contrastive_loss_reference

import vlmcore


def _features(n, d):
    image = F.normalize(torch.randn(n, d), dim=1)
    return image, F.normalize(image + 0.8 * torch.randn(n, d), dim=1)


def test_initialization_follows_openclip_and_big_vision():
    loss = vlmcore.SigLIPLoss()
    assert float(loss.logit_scale.detach()) == pytest.approx(math.log(10.0))
    assert float(loss.logit_bias.detach()) == -10.0
    assert float(loss.scale().detach()) == pytest.approx(10.0)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_loss_and_parameter_gradients_match_reference(backend_name):
    image, text = _features(9, 16)
    module = vlmcore.SigLIPLoss(init_scale=5.0, init_bias=-3.0)
    image.requires_grad_()
    with backend(backend_name):
        out = module(image, text, output_dict=True)
    out["loss"].backward()
    t, b = torch.tensor(math.log(5.0), requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    ref_image = image.detach().clone().requires_grad_()
    ref = sigmoid_contrastive_loss_reference(ref_image, text, t.exp(), b)
    ref.backward()
    assert_close(out["loss"], ref, dtype=torch.float32, name="loss")
    assert_close(module.logit_scale.grad, t.grad, dtype=torch.float32, grad=True, name="d t'")
    assert_close(module.logit_bias.grad, b.grad, dtype=torch.float32, grad=True, name="d bias")
    assert_close(image.grad, ref_image.grad, dtype=torch.float32, grad=True, name="d image")
    assert float(out["logit_bias"]) == -3.0 and float(out["logit_scale"]) == pytest.approx(5.0)


def test_group_ids_pass_through():
    image, text = _features(6, 8)
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    module = vlmcore.SigLIPLoss()
    got = module(image, text, image_group_ids=ids, text_group_ids=ids)
    ref = sigmoid_contrastive_loss_reference(image, text, torch.tensor(10.0), torch.tensor(-10.0),
                                             image_group_ids=ids, text_group_ids=ids)
    assert_close(got, ref, dtype=torch.float32, name="loss")


def test_clip_with_siglip_loss_trains_through_the_op():
    torch.manual_seed(0)
    model = tiny_clip(loss="siglip")
    images, tokens = torch.randn(4, 3, 16, 16), tokenizer(["a photo of red", "a photo of green",
                                                          "a photo of blue", "a photo of gray"])
    out = model(images, tokens)
    ref = sigmoid_contrastive_loss_reference(out["image_features"], out["text_features"], model.logit_scale(),
                                             model.criterion.logit_bias)
    assert_close(out["loss"], ref, dtype=torch.float32, name="loss")
    assert set(out) == {"loss", "logit_scale", "logit_bias", "image_features", "text_features"}
    out["loss"].backward()
    assert model.criterion.logit_bias.grad is not None and model.image_projection.weight.grad is not None


def test_zero_shot_scores_are_sigmoid_and_rank_like_clip():
    torch.manual_seed(0)
    siglip = tiny_clip(loss="siglip")
    clip = tiny_clip()
    clip.load_state_dict({k: v for k, v in siglip.state_dict().items() if not k.startswith("criterion.")},
                         strict=False)
    classifier = vlmcore.zero_shot_classifier(siglip, tokenizer, CLASSES, ["a photo of {}"])
    images = torch.randn(6, 3, 16, 16)
    scores, preds = vlmcore.zero_shot_predict(siglip, images, classifier)
    cos = siglip.encode_image(images) @ classifier
    expected = torch.sigmoid(10.0 * cos - 10.0)
    assert_close(scores, expected, atol=1e-6, rtol=1e-5, name="sigmoid scores")
    assert torch.equal(preds, vlmcore.zero_shot_predict(clip, images, classifier)[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss"):
        tiny_clip(loss="softmax")
    with pytest.raises(ValueError, match="init_scale"):
        vlmcore.SigLIPLoss(init_scale=0.0)
    with pytest.raises(ValueError, match="init_bias"):
        vlmcore.SigLIPLoss(init_bias=float("nan"))
    with pytest.raises(ValueError, match="dist_impl"):
        vlmcore.SigLIPLoss(dist_impl="allgather")
    with pytest.raises(ValueError, match="local_loss"):
        tiny_clip(loss="siglip")(torch.randn(2, 3, 16, 16), tokenizer(["a", "a"]), local_loss=True)
