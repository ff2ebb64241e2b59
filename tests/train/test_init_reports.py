"""Config ``init`` per family (Flamingo: an OpenFlamingo checkpoint; BLIP-2 stage 2: an HF
``Blip2ForConditionalGeneration`` directory; BLIP-2 stage 1: an HF ``Blip2ForImageTextRetrieval``
directory): the peer's checkpoint loads through the task's ``build_model`` (same outputs as the source
model), and a checkpoint with a removed or an extra key is refused by one report naming the key
(:class:`vlmcore.checkpoint_keys.CheckpointKeysError`)."""

import pytest
import torch
from helpers.export_peers import flamingo_overrides, openflamingo_training_checkpoint, trained_looking
from helpers.numerics import assert_close
from helpers.tiny_blip2 import (
    IMAGE_SIZE,
    caption_batch,
    hf_retrieval_outputs,
    retrieval_batch,
    stage1_outputs,
    tiny_hf_blip2,
    tiny_hf_blip2_retrieval,
)
from helpers.training import train_argv
from safetensors.torch import load_file, save_file
from vlmcore.train.config import ConfigError, load_config
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks import get_task

from vlmcore.checkpoint_keys import CheckpointKeysError

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def data(shapes_dataset):
    return shapes_dataset(n_train=64, n_eval=16, n_docs=16, image_size=32, shard_size=32, seed=4)


def build(data, task, tmp_path, *overrides):
    """(task, model) of ``configs/<task>_tiny.yaml`` with the overrides, built under seed 0 (same frozen parts)."""
    argv = train_argv(task, data, tmp_path / "out", *overrides, eval_batch_size=None, context_length=12)
    cfg = load_config(argv[1], argv[2:])
    task_cls = get_task(cfg.task)
    torch.manual_seed(0)
    task = task_cls(cfg, Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length, kind=cfg.tokenizer.type,
                                   media_tokens=task_cls.media_tokens))
    return task, task.build_model(torch.float32).eval()


def flamingo_batch(tok):
    lang_x = torch.randint(4, tok.vocab_size, (2, 9))
    lang_x[:, [0, 5]] = tok.media_token_id
    return torch.randn(2, 2, 1, 3, 16, 16), lang_x


def test_flamingo_init_loads_an_openflamingo_checkpoint(data, tmp_path):
    _, source = build(data, "flamingo", tmp_path, *flamingo_overrides(data))
    trained_looking(source, [n for n, p in source.named_parameters() if p.requires_grad])
    state = openflamingo_training_checkpoint(source, tmp_path / "checkpoint.pt")
    task, loaded = build(data, "flamingo", tmp_path, *flamingo_overrides(data),
                         f"model.flamingo.init={tmp_path}/checkpoint.pt")
    vision_x, lang_x = flamingo_batch(task.tok)
    with torch.no_grad():
        assert torch.equal(loaded(vision_x, lang_x).logits, source(vision_x, lang_x).logits)

    removed = dict(state)
    del removed["module.perceiver.latents"]
    torch.save({"model_state_dict": removed}, tmp_path / "removed.pt")
    with pytest.raises(CheckpointKeysError, match=r"missing 1 keys: perceiver\.latents") as err:
        build(data, "flamingo", tmp_path, *flamingo_overrides(data), f"model.flamingo.init={tmp_path}/removed.pt")
    assert "model.flamingo.init" in str(err.value)
    extra = {**state, "module.perceiver_extra.weight": torch.zeros(2)}
    torch.save({"model_state_dict": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointKeysError, match=r"unexpected 1 keys: perceiver_extra\.weight"):
        build(data, "flamingo", tmp_path, *flamingo_overrides(data), f"model.flamingo.init={tmp_path}/extra.pt")


def blip2_init_overrides(init_dir, image_size: int = IMAGE_SIZE) -> list[str]:
    """``model.blip2_stage2.init`` with the keys the directory decides left unset (the LM is the directory's)."""
    return [f"model.blip2_stage2={{init: '{init_dir}'}}", "model.lm=null",
            f"model.vision={{image_size: {image_size}, freeze: true}}"]


def test_blip2_stage2_init_loads_an_hf_directory(data, tmp_path):
    tok = Tokenizer(f"{data}/tokenizer.json", 12)
    hf = tiny_hf_blip2(tok.vocab_size, tok.media_token_id)
    hf.save_pretrained(tmp_path / "hf")
    task, ours = build(data, "blip2_stage2", tmp_path, *blip2_init_overrides(tmp_path / "hf"))
    assert task.tok.media_token_id == tok.media_token_id and task.tok.vocab_size == tok.vocab_size
    images, input_ids, mask, labels = caption_batch(tok.vocab_size, tok.media_token_id)
    with torch.no_grad():
        expected = hf(pixel_values=images, input_ids=input_ids, attention_mask=mask, labels=labels)
        got = ours(images, input_ids, mask, labels)
    assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5, name="logits")
    assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5, name="loss")

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["language_projection.bias"]
    state["qformer.encoder.layer.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointKeysError, match=r"missing 1 keys: language_projection\.bias; unexpected 1 keys: "
                       r"qformer\.encoder\.layer\.0\.extra\.weight") as err:
        build(data, "blip2_stage2", tmp_path, *blip2_init_overrides(tmp_path / "hf"))
    assert "model.blip2_stage2.init" in str(err.value)


def test_blip2_stage2_init_refuses_the_keys_it_decides(data, tmp_path):
    tiny_hf_blip2(40, 39).save_pretrained(tmp_path / "hf")
    overrides = blip2_init_overrides(tmp_path / "hf", image_size=16) + ["model.blip2_stage2.qformer.num_layers=3",
                                                                        "model.vision.width=48"]
    with pytest.raises(ConfigError) as err:
        build(data, "blip2_stage2", tmp_path, *overrides)
    message = str(err.value)
    for key in ("model.blip2_stage2.qformer: conflicts", "model.vision.width: conflicts",
                "model.vision.image_size: 16 is not the image size of model.blip2_stage2.init (8)"):
        assert key in message, message


def blip2_stage1_init_overrides(init_dir, image_size: int = IMAGE_SIZE) -> list[str]:
    """``model.blip2_stage1.init`` with the keys the directory decides left unset."""
    return [f"model.blip2_stage1={{init: '{init_dir}'}}", f"model.vision={{image_size: {image_size}, freeze: true}}"]


def test_blip2_stage1_init_loads_an_hf_retrieval_directory(data, tmp_path):
    tok = Tokenizer(f"{data}/tokenizer.json", 12, media_tokens=False)
    hf = tiny_hf_blip2_retrieval(tok.vocab_size + 2)  # the word tokenizer's layout: + [CLS], [DEC]
    hf.save_pretrained(tmp_path / "hf")
    task, ours = build(data, "blip2_stage1", tmp_path, *blip2_stage1_init_overrides(tmp_path / "hf"))
    images, text_ids, mask = retrieval_batch(tok.vocab_size + 2)
    text_ids[:, 0] = task.text.cls_token_id
    (itm, itc), (hf_itm, hf_itc) = stage1_outputs(ours, images, text_ids, mask), hf_retrieval_outputs(
        hf, images, text_ids, mask)
    assert_close(itm, hf_itm, atol=1e-5, rtol=1e-5, name="ITM logits")
    assert_close(itc, hf_itc, atol=1e-5, rtol=1e-5, name="ITC similarities")
    assert ours.dec_token_id == tok.vocab_size + 1

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["embeddings.position_embeddings.weight"]
    state["vision_extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointKeysError, match=r"missing 1 keys: embeddings\.position_embeddings\.weight; "
                       r"unexpected 1 keys: vision_extra\.weight") as err:
        build(data, "blip2_stage1", tmp_path, *blip2_stage1_init_overrides(tmp_path / "hf"))
    assert "model.blip2_stage1.init" in str(err.value)


def test_blip2_stage1_init_refuses_the_keys_it_decides_and_another_vocabulary(data, tmp_path):
    tiny_hf_blip2_retrieval(40).save_pretrained(tmp_path / "hf")
    overrides = blip2_stage1_init_overrides(tmp_path / "hf", image_size=16) + [
        "model.blip2_stage1.qformer.num_layers=3", "model.blip2_stage1.embed_dim=16", "model.vision.width=48"]
    with pytest.raises(ConfigError) as err:
        build(data, "blip2_stage1", tmp_path, *overrides)
    message = str(err.value)
    for key in ("model.blip2_stage1.qformer: conflicts", "model.blip2_stage1.embed_dim: conflicts",
                "model.vision.width: conflicts",
                "model.vision.image_size: 16 is not the image size of model.blip2_stage1.init (8)"):
        assert key in message, message
    with pytest.raises(ValueError, match=r"model.blip2_stage1.init: its Q-Former has a text vocabulary of 40 ids, "
                       r"tokenizer.path '.*tokenizer.json' gives \d+ \(\[CLS\] \d+, \[DEC\] \d+\)"):
        build(data, "blip2_stage1", tmp_path, *blip2_stage1_init_overrides(tmp_path / "hf"))


def test_blip2_stage1_text_follows_a_bert_vocabulary(tmp_path):
    import transformers
    from vlmcore.train.tasks.blip2_stage1 import Blip2Text

    words = ["a", "red", "circle"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=True).save_pretrained(tmp_path / "bert")
    text = Blip2Text(Tokenizer(str(tmp_path / "bert"), 8, media_tokens=False))
    assert (text.cls_token_id, text.dec_token_id, text.vocab_size) == (2, 8, 9)  # LAVIS: [DEC] appended
    ids, mask = text.encode(["A red circle"])
    assert ids.tolist() == [[2, 5, 6, 7, 3, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    bert = transformers.BertTokenizerFast.from_pretrained(tmp_path / "bert")
    bert.add_special_tokens({"bos_token": "[DEC]"})  # HF BLIP-2's tokenizer holds it already
    bert.save_pretrained(tmp_path / "blip2")
    text = Blip2Text(Tokenizer(str(tmp_path / "blip2"), 8, media_tokens=False))
    assert (text.cls_token_id, text.dec_token_id, text.vocab_size) == (2, 8, 9)
