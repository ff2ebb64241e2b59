"""CLIP dual encoder, zero-shot classification, retrieval metrics, vision adapters."""

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close
from helpers.tiny_clip import CLASSES, CONTEXT, PAD, tiny_clip, tokenizer
from vlmcore.kernels import backend, contrastive_loss

import vlmcore


def test_encoders_give_normalized_features():
    model = tiny_clip()
    images, tokens = torch.randn(5, 3, 16, 16), tokenizer(["a photo of red"] * 5)
    img, txt = model.encode_image(images), model.encode_text(tokens)
    assert img.shape == (5, 16) and txt.shape == (5, 16)
    assert_close(img.norm(dim=-1), torch.ones(5), name="image norms", atol=1e-5)
    assert_close(txt.norm(dim=-1), torch.ones(5), name="text norms", atol=1e-5)


def test_text_pooling_at_eot():
    model = tiny_clip()
    tokens = tokenizer(["a photo of red", "red"])
    assert model.text.pool_positions(tokens).tolist() == [5, 2]
    # causal tower pooled at EOT: whatever follows the EOT is irrelevant
    noisy = tokens.clone()
    noisy[:, -1] = 7
    assert torch.equal(model.encode_text(tokens), model.encode_text(noisy))
    # no EOT in a row: pooled at its last non-pad token
    no_eot = tokens.clone()
    no_eot[1, 2] = PAD
    assert model.text.pool_positions(no_eot).tolist() == [5, 1]
    # OpenAI convention (eot_token_id=None): the position of the largest id
    openai = tiny_clip(eot_token_id=None)
    ids = torch.tensor([[1, 4, 11, 3, 0, 0, 0, 0]])
    assert openai.text.pool_positions(ids).tolist() == [2]


def test_forward_is_the_fused_loss_of_the_features():
    model = tiny_clip()
    images, tokens = torch.randn(6, 3, 16, 16), tokenizer(["a photo of " + c for c in CLASSES + CLASSES[:2]])
    out = model(images, tokens)
    assert set(out) == {"loss", "i2t_acc", "t2i_acc", "logit_scale", "image_features", "text_features"}
    expected = contrastive_loss(out["image_features"].detach(), out["text_features"].detach(),
                                torch.tensor(1 / 0.07))
    assert_close(out["loss"], expected, name="loss", atol=1e-5)
    assert_close(out["logit_scale"], torch.tensor(1 / 0.07), name="scale", atol=1e-4)
    out["loss"].backward()
    assert model.criterion.logit_scale.grad is not None and float(model.criterion.logit_scale.grad.abs()) > 0
    assert model.visual.conv1.weight.grad is not None and model.text.token_embedding.weight.grad is not None
    assert isinstance(model.criterion, vlmcore.ContrastiveLoss)


def test_group_is_passed_to_the_op():
    model = tiny_clip()
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup or None, got object"):
        model(torch.randn(2, 3, 16, 16), tokenizer(["red", "blue"]), group=object())


def test_triton_and_reference_backends_agree(device):
    """Tiny shapes: the triton backend runs the kernel in the interpreter on CPU, compiled on CUDA."""
    model = tiny_clip().to(device)
    images = torch.randn(4, 3, 16, 16, device=device)
    tokens = tokenizer(["a photo of " + c for c in CLASSES]).to(device)
    results = {}
    for name in ("reference", "triton"):
        model.zero_grad()
        with backend(name):
            out = model(images, tokens)
            out["loss"].backward()
        results[name] = (out["loss"].detach(), model.criterion.logit_scale.grad.clone(),
                         model.image_projection.weight.grad.clone())
    for got, expected, what in zip(results["triton"], results["reference"], ("loss", "grad scale", "grad proj")):
        assert_close(got, expected, name=what, atol=1e-4, rtol=1e-3)


def _colored_images(labels, prototypes, noise=0.3):
    return prototypes[labels] + noise * torch.randn(len(labels), 3, 16, 16)


def test_zero_shot_on_separable_synthetic_set():
    """Train a tiny CLIP for a few steps on (noisy class prototype, caption) pairs, then classify
    fresh images from class-name prompts only."""
    prototypes = torch.randn(len(CLASSES), 3, 16, 16)
    templates = ["a photo of {}", "a picture of the {}", lambda c: c]
    model = tiny_clip()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        labels = torch.randperm(len(CLASSES) * 4)[:8] % len(CLASSES)
        captions = [(templates[step % 2]).format(CLASSES[int(c)]) for c in labels]
        loss = model(_colored_images(labels, prototypes), tokenizer(captions))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    classifier = vlmcore.zero_shot_classifier(model, tokenizer, CLASSES, templates)
    assert classifier.shape == (16, len(CLASSES))
    assert_close(classifier.norm(dim=0), torch.ones(len(CLASSES)), name="column norms", atol=1e-5)
    labels = torch.arange(len(CLASSES)).repeat(8)
    logits, preds = vlmcore.zero_shot_predict(model, _colored_images(labels, prototypes), classifier)
    assert logits.shape == (len(labels), len(CLASSES))
    assert torch.equal(preds, logits.argmax(dim=1))
    accuracy = float((preds == labels).float().mean())
    assert accuracy >= 0.9, f"zero-shot accuracy {accuracy:.2f} on a separable set"


def test_zero_shot_classifier_averages_normalized_prompt_embeddings():
    model = tiny_clip()
    templates = ["a photo of {}", "the {}"]
    classifier = vlmcore.zero_shot_classifier(model, tokenizer, ["red", "blue"], templates)
    with torch.no_grad():
        red = model.encode_text(tokenizer(["a photo of red", "the red"])).mean(dim=0)
    assert_close(classifier[:, 0], F.normalize(red, dim=0), name="class 0 weights", atol=1e-6)


# Hand-computed retrieval example: image features = identity, so text row t is its similarity to
# each of the 3 images. Captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
SIMS = torch.tensor([
    [0.9, 0.1, 0.0],   # t0 -> img0, rank 0
    [0.2, 0.8, 0.0],   # t1 -> img0, rank 1
    [0.1, 0.5, 0.7],   # t2 -> img1, rank 1
    [0.0, 0.3, 0.9],   # t3 -> img1, rank 1
    [0.6, 0.0, 0.4],   # t4 -> img2, rank 1
    [0.5, 0.45, 0.3],  # t5 -> img2, rank 2
])
# i2t: img0's best caption t0 (0.9) is first -> rank 0; img1's best t2 (0.5) is beaten by t1 (0.8)
# -> rank 1; img2's best t4 (0.4) is beaten by t2 (0.7) and t3 (0.9) -> rank 2.


@pytest.mark.parametrize("chunk_size", [1024, 2])
def test_retrieval_metrics_hand_computed(chunk_size):
    metrics = vlmcore.retrieval_metrics(torch.eye(3), SIMS, torch.tensor([0, 0, 1, 1, 2, 2]), ks=(1, 2, 3),
                                        chunk_size=chunk_size)
    expected = {"i2t_R@1": 1 / 3, "i2t_R@2": 2 / 3, "i2t_R@3": 1.0,
                "t2i_R@1": 1 / 6, "t2i_R@2": 5 / 6, "t2i_R@3": 1.0}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["mean_recall"] == pytest.approx(sum(expected.values()) / 6)


def test_retrieval_metrics_one_caption_per_image():
    features = F.normalize(torch.randn(12, 8), dim=-1)
    perfect = vlmcore.retrieval_metrics(features, features)
    assert perfect["i2t_R@1"] == 1.0 and perfect["t2i_R@1"] == 1.0 and set(perfect) >= {"i2t_R@10", "t2i_R@5"}
    # shuffling the captions: R@1 = fraction of fixed points of the permutation
    perm = torch.tensor([0, 2, 1] + list(range(3, 12)))
    shuffled = vlmcore.retrieval_metrics(features, features[perm])
    assert shuffled["i2t_R@1"] == pytest.approx(10 / 12) and shuffled["t2i_R@1"] == pytest.approx(10 / 12)
    with pytest.raises(ValueError, match="text_to_image"):
        vlmcore.retrieval_metrics(features, features[:5])


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_transformers_vision_adapters(which):
    transformers = pytest.importorskip("transformers")
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
               patch_size=8)
    if which == "clip":
        tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg))
        tokens = 4  # CLS dropped (prefix_tokens="drop", the default)
    else:
        tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg))
        tokens = 4
    adapter = vlmcore.HFVisionAdapter(tower)
    images = torch.randn(3, 3, 16, 16)
    assert adapter(images).shape == (3, tokens, 32)
    assert adapter.pooled(images).shape == (3, 32)
    model = tiny_clip(vision_encoder=adapter)
    assert model.encode_image(images).shape == (3, 16)


def test_builtin_vit_shapes_and_errors():
    vit = vlmcore.VisionTransformer(16, 4, 24, 2, 3)
    images = torch.randn(2, 3, 16, 16)
    tokens = vit(images)
    assert vit.num_tokens == 17 and tokens.shape == (2, 17, 24) and vit.width == 24
    assert torch.equal(vit.pooled(images), tokens[:, 0])
    with pytest.raises(ValueError, match="images must be"):
        vit(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="patch_size"):
        vlmcore.VisionTransformer(16, 5, 24, 1, 3)
    with pytest.raises(ValueError, match="width"):
        vlmcore.CLIP(16, vision_encoder=torch.nn.Identity(), vocab_size=8, context_length=4, text_width=8,
                     text_depth=1, text_heads=1)


class FakeTimmViT(torch.nn.Module):
    """The timm ViT interface the adapter relies on: ``embed_dim``, ``num_features``,
    ``forward_features`` and ``forward_head(x, pre_logits=True)``."""

    def __init__(self):
        super().__init__()
        self.embed_dim = self.num_features = 10
        self.patch = torch.nn.Conv2d(3, 10, 8, 8)

    def forward_features(self, x):
        return self.patch(x).flatten(2).transpose(1, 2)

    def forward_head(self, x, pre_logits=False):
        assert pre_logits
        return x[:, 0]


def test_timm_adapter_on_its_interface():
    """Real open_clip / timm models: tests/models/test_vision_towers.py."""
    images = torch.randn(2, 3, 16, 16)
    tm = vlmcore.TimmViTAdapter(FakeTimmViT())
    assert tm(images).shape == (2, 4, 10) and tm.pooled(images).shape == (2, 10)
    assert tiny_clip(vision_encoder=tm).encode_image(images).shape == (2, 16)
    with pytest.raises(TypeError, match="open_clip"):
        vlmcore.OpenCLIPVisionAdapter(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="timm"):
        vlmcore.TimmViTAdapter(torch.nn.Linear(2, 2))


def test_text_tower_input_errors():
    model = tiny_clip()
    tokens = tokenizer(["a photo of red"] * 2)
    with pytest.raises(TypeError, match="tokens"):
        model.encode_text(tokens.float())
    with pytest.raises(ValueError, match="tokens"):
        model.encode_text(tokens[0])
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.cat([tokens, tokens], dim=1))
    with pytest.raises(ValueError, match="images and tokens"):
        model(torch.randn(3, 3, 16, 16), tokens)
    with pytest.raises(ValueError, match="images must be"):
        model.encode_image(torch.randn(2, 1, 16, 16))  # wrong channel count for the built-in ViT


@pytest.mark.parametrize("arg", ["embed_dim", "context_length", "vocab_size", "text_heads", "vision_heads"])
def test_clip_constructor_rejects_nonpositive_sizes(arg):
    name = {"vision_heads": "heads", "text_heads": "heads"}.get(arg, arg)
    with pytest.raises(ValueError, match=name):
        if arg == "embed_dim":
            vlmcore.CLIP(0, image_size=16, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2,
                         vocab_size=12, context_length=CONTEXT, text_width=32, text_depth=1, text_heads=2)
        else:
            tiny_clip(**{arg: 0})
    with pytest.raises(ValueError, match="eot_token_id"):
        tiny_clip(eot_token_id=100)


def test_zero_shot_argument_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match="classnames"):
        vlmcore.zero_shot_classifier(model, tokenizer, [], ["a photo of {}"])
    with pytest.raises(ValueError, match="templates"):
        vlmcore.zero_shot_classifier(model, tokenizer, CLASSES, [])
    with pytest.raises(TypeError, match="classnames"):
        vlmcore.zero_shot_classifier(model, tokenizer, "red", ["a photo of {}"])
    with pytest.raises(ValueError, match="templates must contain"):
        vlmcore.zero_shot_classifier(model, tokenizer, CLASSES, ["a photo"])
    classifier = vlmcore.zero_shot_classifier(model, tokenizer, CLASSES, ["a photo of {}", "the {0}"])
    assert classifier.shape == (16, len(CLASSES))
    with pytest.raises(ValueError, match="classifier"):
        vlmcore.zero_shot_predict(model, torch.randn(2, 3, 16, 16), classifier[:8])
    with pytest.raises(ValueError, match="classifier"):
        vlmcore.zero_shot_predict(model, torch.randn(2, 3, 16, 16), classifier[:, 0])


def test_retrieval_metrics_argument_errors():
    img, txt = torch.randn(4, 8), torch.randn(8, 8)
    pairs = torch.arange(8) // 2
    with pytest.raises(ValueError, match="same width"):
        vlmcore.retrieval_metrics(img, txt[:, :6], pairs)
    with pytest.raises(ValueError, match="text_features"):
        vlmcore.retrieval_metrics(img, txt[0], pairs)
    with pytest.raises(ValueError, match="image_features"):
        vlmcore.retrieval_metrics(img[:0], txt, pairs)
    with pytest.raises(TypeError, match="text_to_image"):
        vlmcore.retrieval_metrics(img, txt, pairs.float())
    with pytest.raises(ValueError, match="text_to_image"):
        vlmcore.retrieval_metrics(img, txt, pairs[:5])
    with pytest.raises(ValueError, match="ks"):
        vlmcore.retrieval_metrics(img, txt, pairs, ks=(0,))
    with pytest.raises(ValueError, match="ks"):
        vlmcore.retrieval_metrics(img, txt, pairs, ks=())
    with pytest.raises(ValueError, match="chunk_size"):
        vlmcore.retrieval_metrics(img, txt, pairs, chunk_size=0)


@pytest.mark.parametrize("kwargs, arg", [({"init_temperature": float("inf")}, "init_temperature"),
                                          ({"init_temperature": 0.0}, "init_temperature"),
                                          ({"max_scale": float("nan")}, "max_scale")])
def test_contrastive_loss_module_rejects_bad_temperature(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        vlmcore.ContrastiveLoss(**kwargs)


def test_vit_attention_rejects_nonpositive_heads_and_ratio():
    with pytest.raises(ValueError, match="heads"):
        vlmcore.VisionTransformer(16, 8, 24, 1, 0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        vlmcore.VisionTransformer(16, 8, 24, 1, 2, mlp_ratio=0.0)
