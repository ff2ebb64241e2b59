"""Task ``blip2_stage2`` with an encoder-decoder LM (a tiny T5 saved with its tokenizer to a directory):
BLIP-2's prefix-LM split (seeded per sample), the loss equal to HF ``Blip2ForConditionalGeneration``
(T5 text model) on the same weights and split, T5 generation equal to HF's, and training through
vlmcore-train under ZeRO-2 and ZeRO-3 with ``eval: generate``."""

import copy
import json
import random
from importlib import resources

import pytest
import torch
import yaml
from transformers import Blip2Config, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
from transformers.models.blip_2.modeling_blip_2 import Blip2ForConditionalGeneration
from transformers.utils import logging as hf_logging
from vlmcore.train import main, tasks
from vlmcore.train.config import load_config
from vlmcore.train.data.pipeline import collate, pair_fields, read_tar
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks.blip2_stage2 import Blip2PrefixLMEncoder, split_caption

hf_logging.set_verbosity_error()

CONFIGS = resources.files("vlmcore.train") / "configs"
CONTEXT, QUERIES, WIDTH = 16, 4, 16
QFORMER = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 48, "num_query_tokens": QUERIES,
           "max_position_embeddings": 32}


class HFVisionTokens(torch.nn.Module):
    """images -> the HF vision model's last hidden state (what BLIP-2 feeds the Q-Former)."""

    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, images):
        return self.vision_model(pixel_values=images).last_hidden_state


@pytest.fixture(scope="module")
def tiny_data(shapes_dataset):
    return shapes_dataset(n_train=32, n_eval=12, n_docs=4, image_size=16, shard_size=32, seed=0)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tiny_data):
    """A tiny T5 and its tokenizer (the shapes word vocabulary + T5's specials) in one directory."""
    out = tmp_path_factory.mktemp("tiny_t5")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_data / "tokenizer.json"), eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<image>", "<|endofchunk|>"])
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(out)
    return out


def _config(tmp_path, data, t5_dir, out, zero_stage=2, generate=False):
    raw = yaml.safe_load((CONFIGS / "blip2_stage2_tiny.yaml").read_text())
    raw.update({"out_dir": str(tmp_path / out), "max_steps": 3, "eval_every": 0, "save_every": 0,
                "progress_bar": False})
    raw["data"] = {"train": [{"shards": f"{data}/train-000000.tar", "batch_size": 4, "shuffle_buffer": 0}],
                   "eval": {"shards": f"{data}/eval-000000.tar", "batch_size": 6,
                            **({"eval": "generate", "generation": {"max_new_tokens": 4}} if generate else {})}}
    raw["tokenizer"] = {"path": str(t5_dir), "context_length": CONTEXT}
    raw["model"]["vision"] = {"image_size": 16, "patch_size": 8, "width": WIDTH, "depth": 1, "heads": 2,
                              "freeze": True}
    raw["model"]["lm"] = {"path": str(t5_dir)}
    raw["model"]["blip2_stage2"]["qformer"] = QFORMER
    raw["deepspeed"]["zero_optimization"] = {"stage": zero_stage}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_split_caption_draws_every_word_boundary_from_the_rng():
    caption = "a  small red circle"
    splits = {split_caption(caption, random.Random(seed)) for seed in range(200)}
    assert splits == {("", "a small red circle"), ("a", "small red circle"), ("a small", "red circle"),
                      ("a small red", "circle")}
    assert split_caption(caption, random.Random(3)) == split_caption(caption, random.Random(3))
    assert split_caption("", random.Random(0)) == ("", "")


def test_prefix_lm_encoder_is_seeded_per_sample(tiny_data, t5_dir):
    tok = Tokenizer(str(t5_dir), CONTEXT)
    encoder = Blip2PrefixLMEncoder(tok, 16, QUERIES, seed=0)
    samples = list(read_tar(str(tiny_data / "train-000000.tar")))[:8]
    first = [encoder(s) for s in samples]
    again = [encoder(s) for s in reversed(samples)][::-1]  # another order (a resumed run, another worker)
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other_seed = [Blip2PrefixLMEncoder(tok, 16, QUERIES, seed=1)(s) for s in samples]
    assert any(not torch.equal(a["labels"], b["labels"]) for a, b in zip(first, other_seed))
    for row, sample in zip(first, samples):
        ids, labels = row["input_ids"], row["labels"]
        assert ids[:QUERIES].tolist() == [tok.media_token_id] * QUERIES
        prefix = ids[QUERIES:int(row["attention_mask"].sum())].tolist()
        suffix = labels[labels != -100].tolist()
        assert prefix[-1] == tok.eos_token_id and suffix[-1] == tok.eos_token_id
        assert row["decoder_attention_mask"].tolist() == (labels != -100).long().tolist()
        caption = pair_fields(sample)[1]
        rejoined = f"{tok.decode(prefix[:-1])} {tok.decode(suffix[:-1])}".split()
        assert rejoined == tok.decode(tok.encode(caption)).split(), (rejoined, caption)


def _hf_blip2_t5(lang_model, media_token_id):
    config = Blip2Config(
        vision_config={"hidden_size": WIDTH, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 48, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        text_config=lang_model.config.to_dict(), num_query_tokens=QUERIES, image_token_index=media_token_id)
    torch.manual_seed(1)
    hf = Blip2ForConditionalGeneration(config).eval()
    hf.language_model.load_state_dict(lang_model.state_dict())
    with torch.no_grad():
        hf.query_tokens.normal_(0, 0.5)
    return hf


def test_loss_and_generation_equal_hf_blip2_t5(tmp_path, tiny_data, t5_dir):
    cfg = load_config(str(_config(tmp_path, tiny_data, t5_dir, "cmp")))
    tok = Tokenizer(str(t5_dir), CONTEXT)
    task = tasks.get_task("blip2_stage2")(cfg, tok)
    ours = task.build_model(torch.float32).eval()
    assert isinstance(ours.lang_model, T5ForConditionalGeneration) and ours.is_encoder_decoder
    hf = _hf_blip2_t5(ours.lang_model, tok.media_token_id)
    ours.vision_encoder = HFVisionTokens(copy.deepcopy(hf.vision_model)).requires_grad_(False).eval()
    ours.load_hf_state_dict(hf.state_dict())
    encoder = task.encoder("pairs", 1)
    batch = collate([encoder(s) for s in list(read_tar(str(tiny_data / "train-000000.tar")))[:6]])
    loss, _ = task.loss(ours, batch, torch.device("cpu"))
    expected = hf(pixel_values=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"], decoder_attention_mask=batch["decoder_attention_mask"]).loss
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)

    # T5 generation from placeholders + a prompt + </s>, as the eval model builds it (vlmcore.eval Blip2Eval)
    prompt = [tok.media_token_id] * QUERIES + tok.encode("a") + [tok.eos_token_id]
    ids = torch.tensor([prompt] * 2)
    options = dict(max_new_tokens=5, min_new_tokens=5, num_beams=2, do_sample=False)
    with torch.no_grad():
        got = ours.generate(batch["images"][:2], ids, **options)
        want = hf.generate(pixel_values=batch["images"][:2], input_ids=ids, **options)
    assert torch.equal(got, want), (got, want)
    texts = task.eval_model(ours).generate([[image] for image in batch["images"][:2]], ["<image>a", "<image>a"],
                                           max_new_tokens=5, num_beams=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_trains_through_vlmcore_train(tmp_path, tiny_data, t5_dir, monkeypatch, zero_stage):
    monkeypatch.setenv("VLMCORE_BACKEND", "reference")  # the kernels are covered by their own tests
    result = main(["--config", str(_config(tmp_path, tiny_data, t5_dir, "run", zero_stage, generate=True))])
    assert result["eval_tokens"] > 0 and 0.0 <= result["caption_token_acc"] <= 1.0, result
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        steps = [line for line in map(json.loads, f) if "loss" in line]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["loss"] > 0 for s in steps)


def test_language_model_directories_load_by_kind(tmp_path, tiny_data, t5_dir):
    from transformers import LlamaConfig, LlamaForCausalLM
    from vlmcore.train.tasks.common import build_language_model

    tok = Tokenizer(str(t5_dir), CONTEXT)
    llama_dir = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(llama_dir)
    for lm_dir, cls in ((llama_dir, LlamaForCausalLM), (t5_dir, T5ForConditionalGeneration)):
        cfg = load_config(str(_config(tmp_path, tiny_data, t5_dir, "kinds")), [f"model.lm.path={lm_dir}"])
        lm = build_language_model(cfg, tok, torch.float64, encoder_decoder=True)
        assert type(lm) is cls and lm.get_input_embeddings().weight.dtype == torch.float64
    with pytest.raises(ValueError, match="T5Config"):  # a causal-only task keeps refusing a seq2seq LM
        build_language_model(cfg, tok)
