"""BLIP VQA (vlmcore/blip/vqa.py) against Hugging Face ``BlipForQuestionAnswering`` with the same tiny
random weights: generated answers, the training loss (HF's mean loss, and salesforce's weighted loss
re-stated over HF's modules), gradients, LAVIS's ranking re-stated in plain PyTorch; salesforce names."""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import assert_close
from helpers.salesforce_blip import T_WIDTH, salesforce_bert, salesforce_lm_head, salesforce_vit

from vlmcore.blip import BlipVQA, MEDConfig, blip_vision_encoder

transformers = pytest.importorskip("transformers")

VOCAB, BOS, ENC, SEP, PAD = 64, 60, 61, 2, 0


def tiny_config():
    # HF's decoder reads the question states through the text config's encoder_hidden_size, which is
    # also the image width: the three widths are one in a BlipForQuestionAnswering.
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=24, encoder_hidden_size=32, bos_token_id=BOS, sep_token_id=SEP,
                pad_token_id=PAD, eos_token_id=SEP, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                label_smoothing=0.1)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8)
    return transformers.BlipConfig(text_config=text, vision_config=vision)


def vqa_from(vision: dict, text: MEDConfig, **vision_extra) -> BlipVQA:
    return BlipVQA(blip_vision_encoder(**vision, **vision_extra), text)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    config = tiny_config()
    hf = transformers.BlipForQuestionAnswering(config).eval()
    v = config.vision_config
    ours = vqa_from(dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                         num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                         image_size=v.image_size, patch_size=v.patch_size), MEDConfig.from_hf(config.text_config))
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours.eval()


def questions(b=3, length=6, seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(3, 50, (b, length), generator=g)
    ids[:, 0] = ENC
    mask = torch.ones(b, length, dtype=torch.long)
    if padded:
        mask[1, length - 2:] = 0
        ids[1, length - 2:] = PAD
    return images, ids, mask


def answers(n=5, length=4, seed=1):
    """``[DEC] tokens [SEP] pad..`` rows, of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (n, length), generator=g)
    ids[:, 0] = BOS
    mask = torch.ones(n, length, dtype=torch.long)
    for row in range(n):
        end = 2 + row % (length - 1)  # the [SEP] position
        if end < length:
            ids[row, end] = SEP
            ids[row, end + 1:] = PAD
            mask[row, end + 1:] = 0
        else:
            ids[row, -1] = SEP
    return ids, mask


def hf_question_states(hf, images, q_ids, q_mask):
    image_embeds = hf.vision_model(pixel_values=images).last_hidden_state
    return hf.text_encoder(input_ids=q_ids, attention_mask=q_mask, encoder_hidden_states=image_embeds).last_hidden_state


# The questions of the comparisons with HF's modules are unpadded: transformers 5.x's BlipTextModel
# does not hide the padding of encoder_hidden_states from the decoder (encoder_attention_mask has no
# effect there), while salesforce does; test_question_padding_is_hidden checks ours hides it.


def salesforce_weighted_loss(hf, images, q_ids, q_mask, a_ids, a_mask, weights, n):
    """salesforce ``BLIP_VQA.forward(train=True)`` over HF's modules: each question's states repeated for
    its ``n`` answers, the decoder's per-answer summed (label-smoothed) loss, weighted, / batch size."""
    q = hf_question_states(hf, images, q_ids, q_mask)
    states = torch.stack([q[b] for b, count in enumerate(n) for _ in range(count)])
    atts = torch.stack([q_mask[b] for b, count in enumerate(n) for _ in range(count)])
    targets = a_ids.masked_fill(a_ids == PAD, -100)
    out = hf.text_decoder(a_ids, attention_mask=a_mask, encoder_hidden_states=states, encoder_attention_mask=atts,
                          labels=targets, reduction="none")
    return (weights * out.loss).sum() / images.shape[0]


@pytest.mark.parametrize("kwargs", [dict(num_beams=1, max_length=8, min_length=1),
                                    dict(num_beams=3, max_length=8, min_length=3)])
def test_generate_matches_hf(pair, kwargs):
    hf, ours = pair
    images, q_ids, q_mask = questions(seed=2, padded=False)
    with torch.no_grad():
        expected = hf.generate(input_ids=q_ids, pixel_values=images, attention_mask=q_mask, **kwargs)
        got = ours.generate(images, q_ids, q_mask, **kwargs)
    assert torch.equal(got, expected), (got, expected)


def test_generation_ignores_question_padding(pair):
    _, ours = pair
    images, q_ids, q_mask = questions(seed=3)
    with torch.no_grad():
        padded = ours.generate(images[1:2], q_ids[1:2], q_mask[1:2], num_beams=2, max_length=8)
        unpadded = ours.generate(images[1:2], q_ids[1:2, :-2], q_mask[1:2, :-2], num_beams=2, max_length=8)
    assert torch.equal(padded, unpadded)


def test_question_padding_is_hidden(pair):
    _, ours = pair
    images, q_ids, q_mask = questions(seed=12)
    a_ids, a_mask = answers(n=2, seed=13)
    rows = torch.tensor([1, 1])  # question 1 is padded
    with torch.no_grad():
        padded = ours(images[1:2], q_ids[1:2], q_mask[1:2], a_ids, a_mask, torch.ones(2), rows - 1)
        unpadded = ours(images[1:2], q_ids[1:2, :-2], q_mask[1:2, :-2], a_ids, a_mask, torch.ones(2), rows - 1)
        garbage = q_ids[1:2].clone()
        garbage[:, -2:] = 7
        other_pad = ours(images[1:2], garbage, q_mask[1:2], a_ids, a_mask, torch.ones(2), rows - 1)
    assert_close(padded, unpadded, atol=1e-5, rtol=1e-5, name="padded vs unpadded question")
    assert_close(other_pad, unpadded, atol=1e-5, rtol=1e-5, name="padding ids do not matter")


def test_loss_matches_hf_mean_loss(pair):
    """HF averages over tokens; with one unpadded answer of weight 1 per question ours is that times
    the answer's target count (salesforce sums over tokens, then averages over questions)."""
    hf, ours = pair
    images, q_ids, q_mask = questions(seed=4)
    a_ids = torch.randint(3, 50, (3, 5), generator=torch.Generator().manual_seed(5))
    a_ids[:, 0] = BOS
    a_ids[:, -1] = SEP
    with torch.no_grad():
        expected = hf(input_ids=q_ids, pixel_values=images, attention_mask=q_mask, labels=a_ids).loss
        got = ours(images, q_ids, q_mask, a_ids, torch.ones_like(a_ids), torch.ones(3), torch.arange(3))
    assert_close(got, expected * (a_ids.shape[1] - 1), atol=2e-5, rtol=2e-5, name="loss vs HF")


def test_weighted_loss_and_gradients_match_salesforce(pair):
    hf, ours = pair
    images, q_ids, q_mask = questions(seed=6, padded=False)
    n = [2, 1, 2]
    a_ids, a_mask = answers(n=sum(n), seed=7)
    weights = torch.tensor([0.6, 0.4, 1.0, 0.3, 0.1])
    hf.zero_grad()
    expected = salesforce_weighted_loss(hf, images, q_ids, q_mask, a_ids, a_mask, weights, n)
    expected.backward()
    ours.zero_grad()
    got = ours(images, q_ids, q_mask, a_ids, a_mask, weights, torch.tensor([0, 0, 1, 2, 2]))
    got.backward()
    assert_close(got, expected, atol=2e-5, rtol=2e-5, name="weighted loss")
    hf_params, our_params = dict(hf.named_parameters()), dict(ours.named_parameters())
    for ours_name, hf_name in [
        ("text_decoder.encoder.layer.1.decoder_attention.self.query.weight",
         "text_decoder.bert.encoder.layer.1.attention.self.query.weight"),
        ("text_decoder.encoder.layer.0.crossattention.self.key.weight",
         "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"),
        ("text_encoder.encoder.layer.0.attention.self.value.weight",
         "text_encoder.encoder.layer.0.attention.self.value.weight"),
        ("text_encoder.encoder.layer.1.crossattention.self.key.weight",
         "text_encoder.encoder.layer.1.crossattention.self.key.weight"),
        ("lm_head.predictions.transform.dense.weight", "text_decoder.cls.predictions.transform.dense.weight"),
        ("visual_encoder.model.encoder.layers.0.self_attn.qkv.weight",
         "vision_model.encoder.layers.0.self_attn.qkv.weight"),
    ]:
        assert our_params[ours_name].grad.abs().sum() > 0, ours_name
        assert_close(our_params[ours_name].grad, hf_params[hf_name].grad, atol=1e-5, rtol=1e-4, name=ours_name)


def lavis_rank_answers(hf, images, q_ids, q_mask, cand_ids, cand_mask, k):
    """LAVIS ``BlipVQA.rank_answers`` (= salesforce ``rank_answer``) in plain PyTorch over HF's modules."""
    q = hf_question_states(hf, images, q_ids, q_mask)
    b = q.shape[0]
    start = torch.full((b, 1), BOS)
    logits = hf.text_decoder(start, encoder_hidden_states=q, encoder_attention_mask=q_mask).logits[:, 0, :]
    prob_first = torch.softmax(logits, dim=1).index_select(1, cand_ids[:, 1])
    _, topk_ids = prob_first.topk(k, dim=1)
    ids = torch.cat([cand_ids.index_select(0, t) for t in topk_ids])
    atts = torch.cat([cand_mask.index_select(0, t) for t in topk_ids])
    targets = ids.masked_fill(ids == PAD, -100)
    states, q_atts = q.repeat_interleave(k, 0), q_mask.repeat_interleave(k, 0)  # LAVIS tile(x, 0, k)
    out = hf.text_decoder(ids, attention_mask=atts, encoder_hidden_states=states, encoder_attention_mask=q_atts,
                          labels=targets, reduction="none")
    best = (-out.loss).view(b, k).argmax(dim=1)
    return topk_ids[torch.arange(b), best]


@pytest.mark.parametrize("k", [3, 8])
def test_rank_matches_lavis(pair, k):
    hf, ours = pair
    images, q_ids, q_mask = questions(b=4, seed=8, padded=False)
    cand_ids, cand_mask = answers(n=8, length=5, seed=9)
    with torch.no_grad():
        expected = lavis_rank_answers(hf, images, q_ids, q_mask, cand_ids, cand_mask, k)
        got = ours.rank_answers(images, q_ids, q_mask, cand_ids, cand_mask, k_test=k)
    assert torch.equal(got, expected), (got, expected)


def test_rank_with_every_candidate_picks_the_lowest_answer_loss(pair):
    _, ours = pair
    images, q_ids, q_mask = questions(b=2, seed=10)
    cand_ids, cand_mask = answers(n=6, length=4, seed=11)
    with torch.no_grad():
        got = ours.rank_answers(images, q_ids, q_mask, cand_ids, cand_mask, k_test=100)
        states = ours.encode_question(images, q_ids, q_mask)
        for row in range(2):
            losses = ours.answer_loss(states[row:row + 1].expand(6, -1, -1), q_mask[row:row + 1].expand(6, -1),
                                      cand_ids, cand_mask)
            assert int(got[row]) == int(losses.argmin())


def salesforce_vqa_state_dict(seed=0):
    """A random salesforce ``BLIP_VQA`` state dict: the decoder cross-attends the question (text width)."""
    names = {**salesforce_vit("visual_encoder."), **salesforce_bert("text_encoder."), **salesforce_lm_head()}
    for key, shape in salesforce_bert("text_decoder.bert.").items():
        cross_kv = ".crossattention.self.key.weight" in key or ".crossattention.self.value.weight" in key
        names[key] = (T_WIDTH, T_WIDTH) if cross_kv else shape
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in names.items()}
    for key in [k for k in sd if k.endswith("position_ids")]:
        sd[key] = torch.arange(sd[key].shape[1])[None]
    sd["text_decoder.cls.predictions.decoder.weight"] = sd["text_decoder.bert.embeddings.word_embeddings.weight"]
    sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    return sd


def salesforce_vqa_model():
    text = MEDConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=24, encoder_width=48, bos_token_id=BOS,
                     enc_token_id=ENC, sep_token_id=SEP)
    return vqa_from(dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                         image_size=32, patch_size=8), text, layer_norm_eps=1e-6)


def test_salesforce_names_load():
    sd = salesforce_vqa_state_dict()
    ours = salesforce_vqa_model()
    ours.load_salesforce_state_dict(sd)
    params = ours.state_dict()
    for ours_name, key in [
        ("text_decoder.encoder.layer.1.decoder_attention.self.query.weight",
         "text_decoder.bert.encoder.layer.1.attention.self.query.weight"),
        ("text_decoder.encoder.layer.0.crossattention.self.value.weight",
         "text_decoder.bert.encoder.layer.0.crossattention.self.value.weight"),
        ("text_encoder.encoder.layer.0.attention.output.dense.weight",
         "text_encoder.encoder.layer.0.attention.output.dense.weight"),
        ("lm_head.predictions.decoder.bias", "text_decoder.cls.predictions.bias"),
        ("lm_head.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight"),
        ("visual_encoder.model.encoder.layers.1.self_attn.qkv.weight", "visual_encoder.blocks.1.attn.qkv.weight"),
        ("visual_encoder.model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ]:
        assert torch.equal(params[ours_name].detach(), sd[key]), ours_name
    assert not any(".decoder_attention." in n for n in params if n.startswith("text_encoder."))
    assert not any(".attention." in n for n in params if n.startswith("text_decoder."))


def test_loading_refuses_mismatches_by_name():
    ours = salesforce_vqa_model()
    sd = salesforce_vqa_state_dict()
    del sd["text_decoder.bert.encoder.layer.1.crossattention.self.key.bias"]
    with pytest.raises(ValueError, match="missing.*decoder_attention|missing.*crossattention"):
        ours.load_salesforce_state_dict(sd)
    sd = salesforce_vqa_state_dict()
    sd["itm_head.weight"] = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="itm_head.weight"):
        ours.load_salesforce_state_dict(sd)
    sd = salesforce_vqa_state_dict()
    sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"] + 1
    with pytest.raises(ValueError, match="differs"):
        ours.load_salesforce_state_dict(sd)


def test_bad_inputs_name_the_argument(pair):
    _, ours = pair
    images, q_ids, q_mask = questions()
    a_ids, a_mask = answers(n=3)
    with pytest.raises(ValueError, match="answer_question"):
        ours(images, q_ids, q_mask, a_ids, a_mask, torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="answer_weights"):
        ours(images, q_ids, q_mask, a_ids, a_mask, torch.ones(2), torch.arange(3))
    with pytest.raises(ValueError, match="k_test"):
        ours.rank_answers(images, q_ids, q_mask, a_ids, a_mask, k_test=0)
    with pytest.raises(ValueError, match="candidate_ids"):
        ours.rank_answers(images, q_ids, q_mask, a_ids[:, :1], a_mask[:, :1])
