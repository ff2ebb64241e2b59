"""Original salesforce/BLIP checkpoints in the trainer and CapFilt: a BERT vocabulary gives BLIP's own
id layout (``[CLS]``/``[SEP]`` from BERT, ``[DEC] = V``, ``[ENC] = V + 1``, as salesforce's
``init_tokenizer``), captions are tokenized as BLIP tokenizes them (HF ``BertTokenizer``,
``padding="max_length"``), ``model.<task>.init`` and ``vlmcore-capfilt --captioner/--filter`` take a
``.pth``. The checkpoints are random tensors under salesforce's names (tests/models/test_blip_salesforce.py),
with widths of 64 so that BLIP's head rule (width / 64) applies."""

from __future__ import annotations

import json
import os

import helpers.salesforce_blip as sf
import pytest
import torch
from helpers.training import train_argv
from vlmcore.train import main
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.pipeline import read_tar
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tools import capfilt, shape_drawing

from vlmcore.blip import load_blip

transformers = pytest.importorskip("transformers")

WORDS = ["a", "picture", "of", "on", "background", "that", "is", *shape_drawing.COLOURS, *shape_drawing.SHAPES]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 40  # BERT vocabulary V = 38, + [DEC] + [ENC]
# train_argv options and settings of the fine-tunings: the config's (salesforce) tower at 32 px
RUN = {"eval_batch_size": 12, "train_batch_size": 4, "context_length": 12, "vision": None}
SETTINGS = ("data.eval.max_batches=1", "model.vision.image_size=32", "model.blip_retrieval.k_test=4", "max_steps=2",
            "eval_every=2", "save_every=0", "optim.warmup_steps=1")


@pytest.fixture()
def salesforce_sizes(monkeypatch):
    """The checkpoint sizes of tests/models/test_blip_salesforce.py with 64-wide towers and this vocabulary."""
    monkeypatch.setattr(sf, "VOCAB", VOCAB)
    monkeypatch.setattr(sf, "V_WIDTH", 64)
    monkeypatch.setattr(sf, "T_WIDTH", 64)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A BERT WordPiece tokenizer directory (what BLIP loads from bert-base-uncased), V = VOCAB - 2."""
    out = tmp_path_factory.mktemp("bert_tok")
    fillers = [f"[unused{i}]" for i in range(VOCAB - 2 - len(SPECIALS) - len(WORDS))]
    (out / "vocab.txt").write_text("\n".join(SPECIALS + WORDS + fillers) + "\n")
    transformers.BertTokenizerFast(str(out / "vocab.txt"), do_lower_case=True).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def data(shapes_dataset):
    # Not the shared set: CapFilt's report must count the 48 training images of this one.
    return shapes_dataset(n_train=48, n_eval=24, n_docs=1, image_size=32, shard_size=24, seed=4)


def test_bert_vocabulary_gives_blips_ids_and_tokenization(bert_dir):
    tok = Tokenizer(str(bert_dir), 12, media_tokens=False)
    hf = transformers.AutoTokenizer.from_pretrained(str(bert_dir))
    assert tok.vocab_size == VOCAB - 2 == len(hf)  # nothing added: [SEP] plays <eos>
    assert tok.eos_token_id == hf.sep_token_id and tok.pad_token_id == hf.pad_token_id
    text = BlipText(tok)
    assert text.bert_layout
    assert (text.cls_token_id, text.sep_token_id) == (hf.cls_token_id, hf.sep_token_id)
    assert (text.dec_token_id, text.enc_token_id, text.vocab_size) == (VOCAB - 2, VOCAB - 1, VOCAB)
    captions = ["a red circle", "a picture of a blue cross on a background that is big"]  # "big": [UNK]
    ids, mask = text.encode(captions)
    expected = hf(captions, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert text.decode(ids[0, 1:]) == "a red circle"
    # BLIP's prompt length: len(tokenizer("a picture of ").input_ids) - 1 ([CLS] + prompt, no [SEP])
    assert 1 + len(text.prompt_ids("a picture of ")) == len(hf("a picture of ").input_ids) - 1


def test_retrieval_fine_tunes_a_salesforce_checkpoint(salesforce_sizes, data, bert_dir, tmp_path):
    state = sf.salesforce_state_dict("retrieval", seed=1)
    torch.save({"model": state, "config": {"queue_size": sf.QUEUE}}, tmp_path / "model_base_retrieval_coco.pth")
    init = tmp_path / "model_base_retrieval_coco.pth"
    result = main(train_argv("blip_retrieval", data, tmp_path / "run", f"model.blip_retrieval.init={init}", *SETTINGS,
                             f"model.blip_retrieval.queue_size={sf.QUEUE}", tokenizer=bert_dir, **RUN))
    assert 0.0 <= result["i2t_R@1"] <= 1.0
    trained = load_blip(str(tmp_path / "run"))  # the run's folder: salesforce's ViT spec, trained weights
    assert trained.spec["vision"]["kind"] == "hf_blip" and trained.config.vocab_size == VOCAB
    assert (trained.config.bos_token_id, trained.config.enc_token_id) == (VOCAB - 2, VOCAB - 1)
    assert not torch.equal(trained.itm_head.weight, state["itm_head.weight"])  # it trained
    # a queue size other than the checkpoint's is refused, naming the key
    with pytest.raises(ValueError, match="model.blip_retrieval.queue_size"):
        main(train_argv("blip_retrieval", data, tmp_path / "run2", f"model.blip_retrieval.init={init}", *SETTINGS,
                        tokenizer=bert_dir, **RUN))


def test_capfilt_runs_salesforce_captioner_and_filter(salesforce_sizes, data, bert_dir, tmp_path):
    captioner, filt = tmp_path / "model_base_caption.pth", tmp_path / "model_base_retrieval.pth"
    torch.save({"model": sf.salesforce_state_dict("caption", seed=2)}, captioner)
    torch.save({"model": sf.salesforce_state_dict("retrieval", seed=3)}, filt)
    report = capfilt.main(["--input", f"{data}/train-*.tar", "--output", str(tmp_path / "out"), "--captioner",
                           str(captioner), "--filter", str(filt), "--tokenizer", str(bert_dir), "--max-length", "6",
                           "--min-length", "2", "--context-length", "12", "--batch-size", "8", "--no-progress"])
    assert report["total"]["images"] == 48
    assert report["total"]["web_kept"] + report["total"]["web_dropped"] == 48
    for name in sorted(os.listdir(tmp_path / "out")):
        if name.endswith(".tar"):
            for sample in read_tar(str(tmp_path / "out" / name)):
                meta = json.loads(sample["json"])
                assert meta["capfilt"]["filter"]["path"] == str(filt) and len(meta["capfilt"]["filter"]["sha256"]) == 64
