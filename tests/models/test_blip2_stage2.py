"""BLIP-2 stage 2 (:class:`vlmcore.Blip2LM`) over tiny HF LMs (random init from configs, no download).

- Same logits, loss and bridge gradients as HF ``Blip2ForConditionalGeneration`` (OPT text model)
  with the same weights (``<image>`` placeholders filled, HF's convention); prefixed queries give
  the same logits as placeholders at the start.
- Decoder-only LMs (OPT, Llama, GPT-2, Qwen2): loss = the LM's CE over the caption only; greedy
  ``generate`` equals a step-by-step argmax through ``forward``; beam search and nucleus sampling run.
- T5 (encoder-decoder): queries prefix the encoder input; loss and greedy generation.
- Frozen LM and vision; save / load of the trainable weights; bad inputs name the argument.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close
from helpers.tiny_lm import VOCAB, tiny_lm
from torch import nn
from transformers import Blip2Config, T5Config, T5ForConditionalGeneration
from transformers.models.blip_2.modeling_blip_2 import Blip2ForConditionalGeneration
from transformers.utils import logging as hf_logging

from vlmcore.blip2 import Blip2LM, QFormer

hf_logging.set_verbosity_error()

QUERIES, WIDTH, IMAGE_TOKEN = 4, 16, VOCAB - 1


class HFVisionTokens(nn.Module):
    """images -> the HF vision model's last hidden state (what BLIP-2 feeds the Q-Former)."""

    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, images):
        return self.vision_model(pixel_values=images).last_hidden_state


def tiny_qformer():
    return QFormer(WIDTH, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, num_query_tokens=QUERIES,
                   vocab_size=40, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0)


def _hf_blip2():
    config = Blip2Config(
        vision_config={"hidden_size": WIDTH, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 48, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        text_config={"model_type": "opt", "vocab_size": VOCAB, "hidden_size": 32, "ffn_dim": 48,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
                     "word_embed_proj_dim": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                     "dropout": 0.0},
        num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
    hf = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        hf.query_tokens.normal_(0, 0.5)
    return hf


def test_matches_hf_blip2_for_conditional_generation():
    hf = _hf_blip2()
    ours = Blip2LM(tiny_qformer(), copy.deepcopy(hf.language_model), HFVisionTokens(copy.deepcopy(hf.vision_model)),
                   image_token_id=IMAGE_TOKEN).eval()
    unused = ours.load_hf_state_dict(hf.state_dict())
    assert all(k.startswith(("vision_model.", "language_model.")) for k in unused)
    images = torch.randn(2, 3, 8, 8)
    text = torch.randint(3, IMAGE_TOKEN, (2, 6))
    input_ids = torch.cat([torch.full((2, QUERIES), IMAGE_TOKEN), text], dim=1)
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0
    labels = input_ids.masked_fill((input_ids == IMAGE_TOKEN) | (mask == 0), -100)
    labels[:, QUERIES:QUERIES + 2] = -100  # a two-token prompt
    hf_out = hf(pixel_values=images, input_ids=input_ids, attention_mask=mask, labels=labels)
    hf_out.loss.backward()
    out = ours(images, input_ids, mask, labels.masked_fill(input_ids == IMAGE_TOKEN, 5))  # ours masks the queries
    out.loss.backward()
    assert_close(out.logits, hf_out.logits, atol=1e-5, rtol=1e-5, name="logits")
    assert_close(out.loss, hf_out.loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(ours.language_projection.weight.grad, hf.language_projection.weight.grad, atol=1e-5, rtol=1e-4)
    assert_close(ours.qformer.query_tokens.grad, hf.query_tokens.grad, atol=1e-5, rtol=1e-4, name="d query_tokens")
    assert_close(ours.qformer.layers[0].cross_attn.key.weight.grad,
                 hf.qformer.encoder.layer[0].crossattention.attention.key.weight.grad, atol=1e-5, rtol=1e-4)
    # the same queries prepended (no placeholders) give the same logits on the text
    prefixed = ours(images, text, mask[:, QUERIES:]).logits
    assert_close(prefixed, out.logits, atol=1e-5, rtol=1e-5, name="prefix vs placeholders")


def _model(kind):
    torch.manual_seed(0)
    return Blip2LM(tiny_qformer(), tiny_lm(kind)).eval()


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2", "qwen2"])
def test_decoder_only_loss_and_generation(kind):
    model = _model(kind)
    image = torch.randn(2, 5, WIDTH)
    ids = torch.randint(3, VOCAB - 1, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    labels = Blip2LM.caption_labels(ids, mask, torch.tensor([3, 2]))
    out = model(None, ids, mask, labels, image_embeds=image)
    logits = out.logits[:, QUERIES:]  # [B, L, V] on the text positions
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(out.loss, expected, atol=1e-5, rtol=1e-5, name=f"{kind} loss")
    out.loss.backward()
    assert model.language_projection.weight.grad is not None and model.qformer.query_tokens.grad is not None
    assert all(p.grad is None for p in model.lang_model.parameters())
    assert all(not p.requires_grad for p in model.lang_model.parameters())
    assert model.qformer.word_embeddings.weight.grad is None

    prompt = ids[:, :3]
    greedy = model.generate(None, prompt, image_embeds=image, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=0)
    assert greedy.shape == (2, 4)
    manual = prompt
    for _ in range(4):  # step-by-step argmax through forward (no cache)
        step = model(None, manual, image_embeds=image).logits[:, -1].argmax(dim=-1, keepdim=True)
        manual = torch.cat([manual, step], dim=1)
    assert torch.equal(greedy, manual[:, 3:]), (greedy, manual)
    beams = model.generate(None, prompt, image_embeds=image, num_beams=3, num_return_sequences=2, max_new_tokens=3,
                           min_new_tokens=3, pad_token_id=0)
    assert beams.shape == (4, 3)
    torch.manual_seed(3)
    sampled = model.generate(None, prompt, image_embeds=image, do_sample=True, top_p=0.9, max_new_tokens=3,
                             min_new_tokens=3, pad_token_id=0)
    assert sampled.shape == (2, 3)
    other = model(None, ids, mask, image_embeds=torch.randn(2, 5, WIDTH)).logits
    assert not torch.allclose(other, out.logits), "the image does not reach the LM"


def test_t5_encoder_decoder():
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                      dropout_rate=0.0, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    model = Blip2LM(tiny_qformer(), T5ForConditionalGeneration(config).eval()).eval()
    image = torch.randn(2, 5, WIDTH)
    prefix = torch.randint(3, VOCAB, (2, 4))
    target = torch.randint(3, VOCAB, (2, 5))
    target[1, -1] = -100
    out = model(None, prefix, None, target, image_embeds=image)
    expected = F.cross_entropy(out.logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)
    assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert model.qformer.query_tokens.grad is not None
    assert all(p.grad is None for p in model.lang_model.parameters())
    greedy = model.generate(None, prefix, image_embeds=image, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    decoder = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(3):
        step = model(None, prefix, decoder_input_ids=decoder, image_embeds=image).logits[:, -1].argmax(-1, keepdim=True)
        decoder = torch.cat([decoder, step], dim=1)
    assert torch.equal(greedy, decoder), (greedy, decoder)
    beams = model.generate(None, prefix, image_embeds=image, num_beams=2, max_new_tokens=3, min_new_tokens=3)
    assert beams.shape[0] == 2


def test_save_and_load_trainable(tmp_path):
    model = _model("opt")
    path = tmp_path / "bridge.safetensors"
    model.save_trainable(path)
    other = _model("opt")
    with torch.no_grad():
        for p in other.trainable_parameters():
            p.add_(1.0)
    other.load_trainable(path)
    for (name, a), b in zip(model.trainable_state_dict().items(), other.trainable_state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(k.startswith("lang_model.") for k in model.trainable_state_dict())
    assert "qformer.word_embeddings.weight" not in model.trainable_state_dict()


def test_stage1_checkpoint_starts_stage2():
    from vlmcore.blip2 import Blip2Stage1, stage1_qformer_state

    stage1 = Blip2Stage1(tiny_qformer(), embed_dim=8, dec_token_id=39)
    model = _model("gpt2")
    model.load_qformer_state_dict(stage1_qformer_state(stage1))
    assert torch.equal(model.qformer.layers[1].ffn_query.fc1.weight, stage1.qformer.layers[1].ffn_query.fc1.weight)


def test_bad_inputs_name_the_argument():
    model = _model("opt")
    image = torch.randn(2, 5, WIDTH)
    ids = torch.randint(3, VOCAB - 1, (2, 7))
    with pytest.raises(ValueError, match="image_embeds must have width vision_width=16"):
        model(None, ids, image_embeds=torch.randn(2, 5, WIDTH + 2))
    with pytest.raises(ValueError, match="input_ids has length 61.*position table \\(64\\)"):
        model(None, torch.ones(2, 61, dtype=torch.long), image_embeds=image)
    with pytest.raises(ValueError, match="image_embeds has batch 1 but input_ids has batch 2"):
        model(None, ids, image_embeds=image[:1])
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(None, ids, labels=ids[:, :3], image_embeds=image)
    placeholder = Blip2LM(tiny_qformer(), tiny_lm("opt"), image_token_id=IMAGE_TOKEN)
    with pytest.raises(ValueError, match="exactly num_query_tokens=4 <image> tokens"):
        placeholder(None, torch.cat([torch.full((2, 2), IMAGE_TOKEN), ids], dim=1), image_embeds=image)
