"""Decoding through the eval models equals the models' own calls; the KV-cached class scores equal a
full forward; a few-shot run writes its predictions and scores them (stand-in scorer until the
scoring module lands, see ``scorer`` below)."""

import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from vlmcore.train.data.tokenizer import Tokenizer, train_word_tokenizer

import vlmcore
from vlmcore.eval import fewshot
from vlmcore.eval.generation import FlamingoEval, FrozenEval

WORDS = "a red blue green circle square cross Output: Question: Short answer: what colour is the shape ?"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    text = tmp_path_factory.mktemp("tok") / "words.txt"
    text.write_text(WORDS + "\n")
    return Tokenizer(train_word_tokenizer(str(text), str(text.with_suffix(".json"))), 64)


def tiny_lm(tok):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).eval()


@pytest.fixture(scope="module")
def flamingo(tok):
    vision = vlmcore.VisionTransformer(8, 4, 16, 1, 2)
    model = vlmcore.Flamingo(vision, tiny_lm(tok), media_token_id=tok.media_token_id, vis_dim=16, num_latents=3,
                             resampler_depth=1, dim_head=8, heads=2, ff_mult=2).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:  # open the gates: the images change the text
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    return model


def images(n, seed=0):
    return list(torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))


def test_flamingo_generate_is_the_models_generate(flamingo, tok):
    model = FlamingoEval(flamingo, tok)
    prompt, pics = "<image>Output:a red circle<|endofchunk|>\n<image>Output:", images(2)
    text = model.generate([pics], [prompt], max_new_tokens=6, num_beams=1)
    ids = torch.tensor([tok.encode(prompt)])
    out = flamingo.generate(torch.stack(pics)[None, :, None], ids, max_new_tokens=6, num_beams=1, do_sample=False,
                            eos_token_id=[tok.eoc_token_id, tok.eos_token_id], pad_token_id=tok.pad_token_id)
    assert text == model.decode(out[:, ids.shape[1]:])
    # a batch with left padding decodes each prompt as alone
    short = "<image>Output:"
    both = model.generate([pics, pics[1:]], [prompt, short], max_new_tokens=6, num_beams=1)
    assert both == text + model.generate([pics[1:]], [short], max_new_tokens=6, num_beams=1)
    with pytest.raises(ValueError, match="prompt 0 has 2 <image> tags but 1 images"):
        model.generate([pics[:1]], [prompt])


def test_class_scores_with_kv_cache_equal_a_full_forward(flamingo, tok):
    model = FlamingoEval(flamingo, tok)
    prompts = ["<image>Output:a red circle<|endofchunk|><image>Output:", "<image>Output:"]
    pics = [images(2), images(1, 1)]
    names = ["red circle", "blue", "green cross square"]
    cached = model.class_logprobs(pics, prompts, names)
    for b, (prompt, row) in enumerate(zip(prompts, pics)):
        for c, name in enumerate(names):
            context, target = tok.encode(prompt), tok.encode(name)
            ids = torch.tensor([context + target])
            logits = flamingo(torch.stack(row)[None, :, None], ids).logits[0, len(context) - 1:-1].float()
            expected = logits.log_softmax(-1).gather(1, torch.tensor(target)[:, None]).mean()
            assert cached[b, c] == pytest.approx(float(expected), abs=1e-4)


def test_frozen_generates_from_its_prefix(tok):
    vision = vlmcore.VisionTransformer(8, 4, 16, 1, 2)
    frozen = vlmcore.FrozenPrefix(vision, tiny_lm(tok), image_token_id=tok.media_token_id, vis_dim=16,
                                  num_prefix_tokens=2).eval()
    model = FrozenEval(frozen, tok)
    texts = model.generate([images(2), images(1)], ["<image>a red circle <image>", "<image>"], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.fixture
def scorer(monkeypatch):
    """A stand-in ``vlmcore.eval.captions`` (the scoring worker's module, not on this branch yet):
    records what it is asked to score; the number it returns is the count of exact matches."""
    calls = []

    def score_captions(predictions, references, *, spice=False):
        calls.append((predictions, references))
        truth = {a["image_id"]: a["caption"] for a in references["annotations"]}
        return {"CIDEr": float(sum(p["caption"] == truth[p["image_id"]] for p in predictions))}

    monkeypatch.setitem(sys.modules, "vlmcore.eval.captions", types.SimpleNamespace(score_captions=score_captions))
    return calls


def test_few_shot_run_writes_and_scores_predictions(flamingo, tok, scorer, tmp_path):
    train = [{"id": i, "image": images(1, i)[0], "captions": ["a red circle"]} for i in range(6)]
    evals = [{"id": 100 + i, "image": images(1, 50 + i)[0], "captions": ["a blue cross", "blue"]} for i in range(5)]
    settings = fewshot.FewShotSettings(shots=(0, 2), trial_seeds=(1, 2), num_samples=4, query_set_size=6,
                                       batch_size=3, max_new_tokens=3, num_beams=2, progress=False,
                                       out_dir=str(tmp_path))
    results = fewshot.evaluate(FlamingoEval(flamingo, tok), "caption", train, evals, settings)
    assert set(results) == {"0", "2"} and len(results["2"]["trials"]) == 2
    assert {"CIDEr", "CIDEr_std"} <= set(results["0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"caption_{s}shot_seed{t}.json" for s in (0, 2) for t in (1, 2)]
    predictions, references = scorer[0]
    assert len(predictions) == 4 and len(references["images"]) == 4  # the references of the scored samples only
    assert len(references["annotations"]) == 8
