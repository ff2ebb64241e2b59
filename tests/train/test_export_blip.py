"""BLIP ``init`` from Hugging Face directories and ``vlmcore-export --to hf``: transformers' own BLIP models
with tiny trained-looking weights -> ``save_pretrained`` -> ``model.<task>.init`` (same ITM / ITC scores or LM
logits as the source) -> the task's writer -> ``from_pretrained(..., output_loading_info=True)`` with nothing
missing or unexpected -> the same outputs again (fp32, 1e-5). A checkpoint with a removed or an extra key is
refused by one report naming it; a run whose ViT is vlmcore's is refused naming the reason. 2-step runs through
vlmcore-train from an init (blip_vqa, blip_caption, blip_nlvr, blip_retrieval) train from the loaded weights
(checked on the engine's module at the first loss) and export; ``model.vision.freeze`` applies to an init's ViT."""

import json

import pytest
import torch
from helpers.numerics import assert_close
from helpers.training import read_metrics, train_argv
from vlmcore.train import main as train
from vlmcore.train.config import load_config
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks import get_task
from vlmcore.train.tasks.run_loader import build_run_model
from vlmcore.train.tools import export

from vlmcore.checkpoint_keys import CheckpointKeysError

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 40  # a BERT vocabulary of 38 + [DEC] 38 + [ENC] 39 (BLIP's layout, train/data/blip_text.py)
DEC, SEP, PAD = 38, 3, 0
SPECIAL_IDS = {"pad_token_id": PAD, "bos_token_id": DEC, "enc_token_id": DEC + 1, "sep_token_id": SEP}


@pytest.fixture(scope="module")
def data(shapes_dataset):
    return shapes_dataset(n_train=64, n_eval=16, n_docs=16, image_size=32, shard_size=32, seed=4)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A BERT WordPiece tokenizer directory of VOCAB - 2 tokens."""
    out = tmp_path_factory.mktemp("bert_tok")
    words = ["a", "picture", "of", "red", "green", "blue", "circle", "square", "triangle", "cross"]
    fillers = [f"[unused{i}]" for i in range(VOCAB - 2 - len(SPECIALS) - len(words))]
    (out / "vocab.txt").write_text("\n".join(SPECIALS + words + fillers) + "\n")
    transformers.BertTokenizerFast(str(out / "vocab.txt"), do_lower_case=True).save_pretrained(str(out))
    return out


def hf_config(width=32):
    """A tiny BlipConfig in the tokenizer's layout; ``width``: text and vision width (one in a VQA model)."""
    text = dict(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=2 * width, max_position_embeddings=64, encoder_hidden_size=width,
                bos_token_id=DEC, sep_token_id=SEP, pad_token_id=PAD, eos_token_id=SEP)
    vision = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * width,
                  image_size=32, patch_size=8)
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def hf_model(architecture: str, seed: int = 0, width: int = 32):
    """transformers' ``architecture`` with every parameter moved off its initialization (trained-looking)."""
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(hf_config(width)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def build(data, bert_dir, task, tmp_path, *overrides):
    """(task, model) of ``configs/<task>_tiny.yaml`` with the overrides, on the BERT tokenizer, fp32, eval mode."""
    no_answers = ['model.blip_vqa.answer_list=""'] if task == "blip_vqa" else []  # no evaluation here
    argv = train_argv(task, data, tmp_path / "out", *no_answers, *overrides, eval_batch_size=None, context_length=12,
                      tokenizer=bert_dir, vision="model.vision={image_size: 32, patch_size: 8, width: 32, depth: 1, "
                                                 "heads: 2}")
    cfg = load_config(argv[1], argv[2:])
    task_cls = get_task(cfg.task)
    torch.manual_seed(0)
    task = task_cls(cfg, Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length, kind=cfg.tokenizer.type,
                                   media_tokens=task_cls.media_tokens))
    return task, task.build_model(torch.float32).eval()


def inputs(seed=0, b=3, length=7):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(5, VOCAB - 2, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, -2:] = 0
    ids[1, -2:] = PAD
    return images, ids, mask


@torch.no_grad()
def retrieval_outputs(model, hf: bool):
    """(ITM logits [B, 2], ITC cosine similarity [B, B]) of a BlipForImageTextRetrieval or our BLIP."""
    images, ids, mask = inputs()
    if hf:
        return (model(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=True).itm_score,
                model(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False).itm_score)
    return (model.itm_logits(model.encode_image(images), ids, mask, replace_first_token=False),
            model.itc_similarity(images, ids, mask))


@torch.no_grad()
def caption_logits(model, hf: bool):
    """(decoder logits [B, L, vocab],) of a BlipForConditionalGeneration or our BLIP."""
    images, ids, mask = inputs(seed=1)
    ids[:, 0] = DEC
    if hf:
        return (model(pixel_values=images, input_ids=ids, attention_mask=mask).logits,)
    return (model.decoder_logits(model.encode_image(images), ids, mask),)


def reload(directory, architecture):
    """transformers' ``from_pretrained`` of an exported directory; asserts nothing missing / unexpected."""
    peer, info = getattr(transformers, architecture).from_pretrained(str(directory), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return peer.eval()


CASES = [("blip_retrieval", "hf", "BlipForImageTextRetrieval", retrieval_outputs),
         ("blip_caption", "hf", "BlipForConditionalGeneration", caption_logits),
         ("blip_pretrain", "hf_retrieval", "BlipForImageTextRetrieval", retrieval_outputs),
         ("blip_pretrain", "hf_caption", "BlipForConditionalGeneration", caption_logits)]


@pytest.mark.parametrize("task_name,fmt,architecture,outputs", CASES)
def test_hf_init_and_export_round_trip(data, bert_dir, tmp_path, task_name, fmt, architecture, outputs):
    source = hf_model(architecture)
    source.save_pretrained(tmp_path / "hf")
    task, ours = build(data, bert_dir, task_name, tmp_path, f"model.{task_name}.init={tmp_path}/hf",
                       f"model.{task_name}.queue_size=8")
    expected = outputs(source, hf=True)
    for got, want in zip(outputs(ours, hf=False), expected, strict=True):
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"{architecture} init")
    task.peer_exporters()[fmt](ours, str(tmp_path / "out_hf"))
    peer = reload(tmp_path / "out_hf", architecture)
    assert json.loads((tmp_path / "out_hf" / "config.json").read_text())["architectures"] == [architecture]
    for got, want in zip(outputs(peer, hf=True), expected, strict=True):
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"{architecture} export")


def test_hf_init_reports_removed_and_extra_keys_and_the_wrong_architecture(data, bert_dir, tmp_path):
    source = hf_model("BlipForImageTextRetrieval")
    source.save_pretrained(tmp_path / "hf")
    state = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["itm_head.bias"]
    state["text_encoder.pooler.dense.weight"] = torch.zeros(32, 32)
    safetensors_torch.save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointKeysError, match=r"missing 1 keys: itm_head\.bias; unexpected 1 keys: "
                                                  r"text_encoder\.pooler\.dense\.weight") as err:
        build(data, bert_dir, "blip_retrieval", tmp_path, f"model.blip_retrieval.init={tmp_path}/hf")
    assert "model.blip_retrieval.init" in str(err.value)
    hf_model("BlipForConditionalGeneration").save_pretrained(tmp_path / "captioner")
    with pytest.raises(ValueError, match="model.blip_retrieval.init .*BlipForConditionalGeneration; this needs a "
                                         "BlipForImageTextRetrieval"):
        build(data, bert_dir, "blip_retrieval", tmp_path, f"model.blip_retrieval.init={tmp_path}/captioner")


def test_export_of_a_vlmcore_vit_is_refused_naming_the_reason(data, bert_dir, tmp_path):
    task, ours = build(data, bert_dir, "blip_retrieval", tmp_path)
    with pytest.raises(ValueError, match="model.blip_retrieval.init: this run's ViT is vlmcore's"):
        task.peer_exporters()["hf"](ours, str(tmp_path / "out"))


@pytest.mark.slow  # ~170 s on the shared 2-core machine (DeepSpeed start included)
def test_retrieval_run_from_hf_trains_and_exports(data, bert_dir, tmp_path):
    """vlmcore-train: 2 steps of blip_retrieval from a BlipForImageTextRetrieval, then vlmcore-export --to hf."""
    hf_model("BlipForImageTextRetrieval", seed=3).save_pretrained(tmp_path / "hf")
    argv = train_argv("blip_retrieval", data, tmp_path / "run", f"model.blip_retrieval.init={tmp_path}/hf",
                      "model.blip_retrieval.queue_size=8", "model.vision.image_size=32", "max_steps=2",
                      "save_every=0", "optim.warmup_steps=1", eval_batch_size=None, train_batch_size=4,
                      context_length=12, tokenizer=bert_dir, vision=None)
    train(argv)
    assert [s["step"] for s in read_metrics(tmp_path / "run")[0]] == [1, 2]
    files = export.main(["--run", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "out_hf")])
    assert "config.json" in files and "model.safetensors" in files
    _, trained = build_run_model(str(tmp_path / "run"))
    source = reload(tmp_path / "hf", "BlipForImageTextRetrieval")
    assert not torch.equal(trained.itm_head.weight, source.itm_head.weight)  # it trained
    peer = reload(tmp_path / "out_hf", "BlipForImageTextRetrieval")
    for got, want in zip(retrieval_outputs(trained.eval(), hf=False), retrieval_outputs(peer, hf=True), strict=True):
        assert_close(got, want, atol=1e-5, rtol=1e-5, name="exported run")


@torch.no_grad()
def vqa_answer_logits(model, hf: bool):
    """(answer decoder logits [N, La, vocab],) of a BlipForQuestionAnswering or our BlipVQA on one batch."""
    images, q_ids, _ = inputs(seed=2)
    q_ids[:, 0] = DEC + 1  # [ENC]: HF's question encoder takes the ids as given
    q_mask = torch.ones_like(q_ids)  # padded questions against HF: tests/models/test_blip_vqa.py
    a_ids, a_mask = inputs(seed=3, length=4)[1:]
    a_ids[:, 0] = DEC
    if not hf:
        return (model.answer_logits(model.encode_question(images, q_ids, q_mask), q_mask, a_ids, a_mask),)
    image_embeds = model.vision_model(pixel_values=images)[0]
    question = model.text_encoder(input_ids=q_ids, attention_mask=q_mask, encoder_hidden_states=image_embeds)[0]
    return (model.text_decoder(input_ids=a_ids, attention_mask=a_mask, encoder_hidden_states=question,
                               encoder_attention_mask=q_mask).logits,)


def test_vqa_hf_init_and_export_round_trip(data, bert_dir, tmp_path):
    source = hf_model("BlipForQuestionAnswering", seed=5)
    source.save_pretrained(tmp_path / "hf")
    task, ours = build(data, bert_dir, "blip_vqa", tmp_path, f"model.blip_vqa.init={tmp_path}/hf")
    expected = vqa_answer_logits(source, hf=True)
    assert_close(vqa_answer_logits(ours, hf=False)[0], expected[0], atol=1e-5, rtol=1e-5, name="vqa init")
    task.peer_exporters()["hf"](ours, str(tmp_path / "out_hf"))
    peer = reload(tmp_path / "out_hf", "BlipForQuestionAnswering")
    assert_close(vqa_answer_logits(peer, hf=True)[0], expected[0], atol=1e-5, rtol=1e-5, name="vqa export")


@pytest.fixture()
def pretrained_pth(monkeypatch, tmp_path):
    """A salesforce model_base.pth (random tensors under BLIP_Pretrain's names) in this tokenizer's layout,
    64-wide towers (BLIP's head rule width / 64; one width for image and text, as BLIP-base)."""
    import helpers.salesforce_blip as sf

    for name, value in (("VOCAB", VOCAB), ("V_WIDTH", 64), ("T_WIDTH", 64)):
        monkeypatch.setattr(sf, name, value)
    state = sf.salesforce_state_dict("pretrain", seed=6)
    torch.save({"model": state}, tmp_path / "model_base.pth")
    return tmp_path / "model_base.pth", state


def test_vqa_init_from_a_pretrained_blip_fills_encoder_and_decoder(data, bert_dir, tmp_path, pretrained_pth):
    from vlmcore.blip import blip_from_salesforce

    path, state = pretrained_pth
    _, vqa = build(data, bert_dir, "blip_vqa", tmp_path, f"model.blip_vqa.init={path}")
    blip = blip_from_salesforce(str(path), momentum=None, text_overrides=SPECIAL_IDS)
    images, q_ids, q_mask = inputs(seed=2)
    a_ids, a_mask = inputs(seed=3, length=4)[1:]
    a_ids[:, 0] = DEC  # BLIP's decoder_logits takes [DEC] as given
    with torch.no_grad():
        question = vqa.encode_question(images, q_ids, q_mask)
        enc_ids = q_ids.clone()
        enc_ids[:, 0] = blip.config.enc_token_id
        assert_close(question, blip.text_encoder(enc_ids, q_mask, mode="multimodal",
                                                 image_embeds=blip.encode_image(images)), atol=1e-5, rtol=1e-5,
                     name="question encoder = BLIP's text encoder")
        # the answer decoder is BLIP's decoder, attending the question states instead of the image
        assert_close(vqa.answer_logits(question, None, a_ids, a_mask), blip.decoder_logits(question, a_ids, a_mask),
                     atol=1e-5, rtol=1e-5, name="answer decoder = BLIP's text decoder")
    removed = {k: v for k, v in state.items() if k != "text_decoder.bert.encoder.layer.1.attention.self.key.bias"}
    torch.save({"model": removed}, tmp_path / "removed.pth")
    with pytest.raises(CheckpointKeysError, match=r"missing 1 keys: text_encoder\.encoder\.layer\.1\."
                                                  r"decoder_attention\.self\.key\.bias") as err:
        build(data, bert_dir, "blip_vqa", tmp_path, f"model.blip_vqa.init={tmp_path}/removed.pth")
    assert "model.blip_vqa.init" in str(err.value)
    torch.save({"model": {**state, "text_encoder.extra.weight": torch.zeros(2)}}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointKeysError, match=r"unexpected 1 keys: text_encoder\.extra\.weight"):
        build(data, bert_dir, "blip_vqa", tmp_path, f"model.blip_vqa.init={tmp_path}/extra.pth")


def test_nlvr_init_from_a_pretrained_blip_copies_cross_attention_into_both(data, bert_dir, tmp_path, pretrained_pth):
    from vlmcore.blip import blip_from_salesforce

    path, state = pretrained_pth
    _, nlvr = build(data, bert_dir, "blip_nlvr", tmp_path, f"model.blip_nlvr.init={path}",
                    "model.blip_nlvr.merge_from_layer=2")  # 2 layers: every layer averages the two images
    blip = blip_from_salesforce(str(path), momentum=None, text_overrides=SPECIAL_IDS)
    params = dict(nlvr.named_parameters())
    for twin in ("self0", "self1"):
        assert torch.equal(params[f"text_encoder.encoder.layer.1.crossattention.{twin}.value.weight"],
                           state["text_encoder.encoder.layer.1.crossattention.self.value.weight"])
    images, ids, mask = inputs(seed=4)
    ids[:, 0] = blip.config.enc_token_id
    with torch.no_grad():  # the same image twice: the averaged twins are BLIP's one cross-attention
        embeds = nlvr.visual_encoder(images)
        assert_close(nlvr.text_encoder(ids, mask, embeds, embeds),
                     blip.text_encoder(ids, mask, mode="multimodal", image_embeds=blip.encode_image(images)),
                     atol=1e-5, rtol=1e-5, name="NLVR2 text encoder = BLIP's")
    torch.save({"model": {**state, "itm_head.extra": torch.zeros(2)}}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointKeysError, match=r"model\.blip_nlvr\.init .*unexpected 1 keys: itm_head\.extra"):
        build(data, bert_dir, "blip_nlvr", tmp_path, f"model.blip_nlvr.init={tmp_path}/extra.pth")


# ---- 2-step runs through vlmcore-train from an init: the run trains from the loaded weights ----


def at_first_loss(monkeypatch, task_name: str, check) -> list:
    """``check(module)`` on the module the run's DeepSpeed engine trains, in eval mode, at the task's first
    loss (before any update); returns the list its results go in (one per run)."""
    task_cls, results = get_task(task_name), []
    real = task_cls.loss

    def loss(self, model, *args, **kwargs):
        if not results:
            module = model.module
            module.eval()
            results.append(check(module))
            module.train()
        return real(self, model, *args, **kwargs)

    monkeypatch.setattr(task_cls, "loss", loss)
    return results


def assert_trained_only_trainable(initial, trained, run_dir):
    """The run's ``trainable.safetensors`` holds exactly ``initial``'s trainable parameters, and only those
    moved (all of them but parameters no loss reaches, e.g. an unused pooler)."""
    saved = safetensors_torch.load_file(str(run_dir / "trainable.safetensors"))
    trainable = {n for n, p in initial.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and len(trainable) < len(list(initial.parameters()))  # some are frozen
    after = dict(trained.named_parameters())
    moved = {n for n, p in initial.named_parameters() if not torch.equal(p, after[n])}
    assert moved <= trainable and len(moved) > 0.9 * len(trainable), sorted(trainable - moved)


@pytest.fixture(scope="module")
def vqa_shards(tmp_path_factory):
    from helpers.vqa_nlvr_files import write_vqav2
    from vlmcore.train.tools.convert_vqa import convert_vqav2

    files = write_vqav2(tmp_path_factory.mktemp("vqav2"))
    out = tmp_path_factory.mktemp("vqa_shards")
    convert_vqav2(str(files / "q.json"), str(files / "a.json"), str(files / "images"), str(out), split="train")
    return out


def test_vqa_run_from_hf_trains_from_the_loaded_weights_and_exports(data, bert_dir, vqa_shards, tmp_path,
                                                                     monkeypatch):
    """vlmcore-train: 2 steps of blip_vqa from a BlipForQuestionAnswering with its ViT frozen (the engine's
    module answers as the source before the first update; only the rest moves), then vlmcore-export --to hf:
    transformers loads it cleanly and answers as the trained run."""
    source = hf_model("BlipForQuestionAnswering", seed=7)
    source.save_pretrained(tmp_path / "hf")
    expected = vqa_answer_logits(source, hf=True)[0]

    def frozen_vit_answers_as_the_source(module):
        assert not any(p.requires_grad for p in module.visual_encoder.parameters())
        assert_close(vqa_answer_logits(module, hf=False)[0], expected, atol=1e-5, rtol=1e-5,
                     name="the run's model at step 1")
        return True

    checked = at_first_loss(monkeypatch, "blip_vqa", frozen_vit_answers_as_the_source)
    init = (f"model.blip_vqa.init={tmp_path}/hf", "model.vision.freeze=true")
    train(train_argv("blip_vqa", data, tmp_path / "run", *init, 'model.blip_vqa.answer_list=""', "max_steps=2",
                     "save_every=0", "optim.warmup_steps=1", f"data.train.0.shards={vqa_shards}/train-000000.tar",
                     "data.train.0.batch_size=8", eval_batch_size=None, context_length=12, tokenizer=bert_dir,
                     vision=None))
    assert checked == [True]
    steps, _ = read_metrics(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2] and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    _, trained = build_run_model(str(tmp_path / "run"))
    _, initial = build(data, bert_dir, "blip_vqa", tmp_path, *init)
    assert_trained_only_trainable(initial, trained, tmp_path / "run")
    export.main(["--run", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "out_hf")])
    peer = reload(tmp_path / "out_hf", "BlipForQuestionAnswering")
    got = vqa_answer_logits(trained.eval(), hf=False)[0]
    assert not torch.allclose(got, expected, atol=1e-3)  # it trained
    assert_close(vqa_answer_logits(peer, hf=True)[0], got, atol=1e-5, rtol=1e-5, name="exported run")


def test_caption_run_from_hf_trains_and_exports(data, bert_dir, tmp_path):
    """vlmcore-train: 2 steps of blip_caption from a BlipForConditionalGeneration, then vlmcore-export --to hf."""
    source = hf_model("BlipForConditionalGeneration", seed=8)
    source.save_pretrained(tmp_path / "hf")
    train(train_argv("blip_caption", data, tmp_path / "run", f"model.blip_caption.init={tmp_path}/hf",
                     "model.vision.image_size=32", "max_steps=2", "save_every=0", "optim.warmup_steps=1",
                     eval_batch_size=None, train_batch_size=4, context_length=12, tokenizer=bert_dir, vision=None))
    assert [s["step"] for s in read_metrics(tmp_path / "run")[0]] == [1, 2]
    export.main(["--run", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "out_hf")])
    _, trained = build_run_model(str(tmp_path / "run"))
    got = caption_logits(trained.eval(), hf=False)[0]
    assert not torch.allclose(got, caption_logits(source, hf=True)[0], atol=1e-3)  # it trained
    peer = reload(tmp_path / "out_hf", "BlipForConditionalGeneration")
    assert_close(caption_logits(peer, hf=True)[0], got, atol=1e-5, rtol=1e-5, name="exported run")


@pytest.fixture(scope="module")
def nlvr_shards(tmp_path_factory):
    from helpers.vqa_nlvr_files import write_nlvr2
    from vlmcore.train.tools.convert_vqa import convert_nlvr2

    files = write_nlvr2(tmp_path_factory.mktemp("nlvr2"))
    out = tmp_path_factory.mktemp("nlvr_shards")
    convert_nlvr2(str(files / "dev.json"), str(files / "images"), str(out))
    return out


def test_nlvr_run_from_a_pretrained_blip_trains_and_evaluates(data, bert_dir, nlvr_shards, tmp_path, monkeypatch,
                                                              pretrained_pth):
    """vlmcore-train: 2 steps of blip_nlvr from a salesforce pre-trained BLIP; before the first update both
    twins of every layer's cross-attention (attention and output projection) are the source's one."""
    path, state = pretrained_pth

    def twins_are_the_source(module):
        params, compared = dict(module.named_parameters()), 0
        for name, value in state.items():
            if name.startswith("text_encoder.encoder.layer.") and ".crossattention." in name:
                for a, b in ((".self.", ".self0."), (".self.", ".self1."), (".dense.", ".dense0."),
                             (".dense.", ".dense1.")):
                    if a in name:
                        assert torch.equal(params[name.replace(a, b)], value), name.replace(a, b)
                        compared += 1
        return compared

    checked = at_first_loss(monkeypatch, "blip_nlvr", twins_are_the_source)
    result = train(train_argv("blip_nlvr", data, tmp_path / "run", f"model.blip_nlvr.init={path}", "max_steps=2",
                              "save_every=0", "optim.warmup_steps=1", "eval_every=2", "data.eval.max_batches=1",
                              f"data.train.0.shards={nlvr_shards}/dev-000000.tar", "data.train.0.batch_size=8",
                              eval_shards=f"{nlvr_shards}/dev-000000.tar", eval_batch_size=12, context_length=12,
                              tokenizer=bert_dir, vision=None))
    assert checked == [2 * 2 * 4 * 2]  # 2 layers x 2 twins x (query, key, value, output dense) x (weight, bias)
    steps, evals = read_metrics(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2] and all(0.0 <= s["accuracy"] <= 1.0 for s in steps)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert evals and result["eval_samples"] == 12 and 0.0 <= result["nlvr_acc"] <= 1.0


@pytest.mark.parametrize("task_name,architecture", [("blip_vqa", "BlipForQuestionAnswering"),
                                                    ("blip_caption", "BlipForConditionalGeneration"),
                                                    ("blip_retrieval", "BlipForImageTextRetrieval")])
def test_init_honours_vision_freeze(data, bert_dir, tmp_path, task_name, architecture):
    """``model.vision.freeze`` freezes the ViT an init brings, as it does the one model.vision builds;
    ``unlocked_layers`` (blocks of model.vision's tower) is refused by name."""
    hf_model(architecture).save_pretrained(tmp_path / "hf")
    init = f"model.{task_name}.init={tmp_path}/hf"
    _, model = build(data, bert_dir, task_name, tmp_path, init, "model.vision.freeze=true")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("visual_encoder.") for n in trainable)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("text_encoder.", "text_decoder.")))
    with pytest.raises(ValueError, match=f"model.vision.unlocked_layers: .*model.{task_name}.init"):
        build(data, bert_dir, task_name, tmp_path, init, "model.vision.freeze=true", "model.vision.unlocked_layers=1")


def test_nlvr_init_honours_vision_freeze(data, bert_dir, tmp_path, pretrained_pth):
    path, _ = pretrained_pth
    _, model = build(data, bert_dir, "blip_nlvr", tmp_path, f"model.blip_nlvr.init={path}", "model.vision.freeze=true")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("visual_encoder.") for n in trainable)


def test_built_vit_keeps_its_unlocked_layers(data, bert_dir, tmp_path):
    """Without an init, BLIP's ViT is model.vision's tower: ``freeze`` with ``unlocked_layers: 1`` trains its
    last block and final norm only."""
    _, model = build(data, bert_dir, "blip_caption", tmp_path, "model.vision.depth=2", "model.vision.freeze=true",
                     "model.vision.unlocked_layers=1")
    names = [n for n, _ in model.visual_encoder.named_parameters()]
    unlocked = {n for n in names if n.startswith(("blocks.1.", "ln_post."))}
    assert unlocked and len(unlocked) < len(names)
    assert {n for n, p in model.visual_encoder.named_parameters() if p.requires_grad} == unlocked
