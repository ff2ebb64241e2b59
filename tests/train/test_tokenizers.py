"""CLIP tokenizers reproduce OpenCLIP exactly; special tokens only for the tasks that ask for them.

The reference is open_clip's own ``open_clip.tokenize`` (the real package, installed --no-deps). The HF
CLIP directory is written from open_clip's bundled BPE vocabulary (the same vocabulary as OpenAI's).
"""

import json

import pytest
import torch
from vlmcore.train.config import ConfigError, load_config
from vlmcore.train.data.tokenizer import EOC, MEDIA, Tokenizer

open_clip = pytest.importorskip("open_clip")

TRICKY = [
    "A photo of a DOG.",
    "",  # -> start, end, zeros
    "  Café   naïve  façade 東京 🙂  ",  # unicode, repeated spaces
    "&amp;amp; <b>bold</b> &lt;3",  # HTML entities (unescaped twice, as open_clip does)
    "Ã©tÃ© mojibake",  # ftfy repairs this
    "ﬁne ligature ½ — “quotes”",
    "line\nbreak\ttab\r\n end",
    "don't it's we'll 123,456.78",
    "word " * 100,  # longer than the context: truncated, end token kept last
]


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A transformers CLIPTokenizer directory built from open_clip's BPE vocabulary and merges."""
    from transformers import CLIPTokenizer

    bpe = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's names -> OpenAI's
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    d = tmp_path_factory.mktemp("hf_clip_tokenizer")
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(str(d))
    return str(d)


def test_open_clip_kind_equals_open_clip_tokenize():
    tok = Tokenizer(kind="open_clip", context_length=77, media_tokens=False)
    ours, ref = tok(TRICKY), open_clip.tokenize(TRICKY)
    assert ours.shape == (len(TRICKY), 77) and torch.equal(ours, ref)
    assert ours[1, :3].tolist() == [49406, 49407, 0]  # empty string
    assert ours[-1, 0] == 49406 and ours[-1, -1] == 49407  # truncated, end token kept
    assert tok.vocab_size == 49408 and tok.media_token_id is None and tok.eoc_token_id is None
    assert (tok.start_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 0)
    short = Tokenizer(kind="open_clip", context_length=8, media_tokens=False)
    assert torch.equal(short(TRICKY), open_clip.tokenize(TRICKY, context_length=8))


def test_hf_clip_directory_follows_open_clip(hf_clip_dir):
    tok = Tokenizer(hf_clip_dir, 77, media_tokens=False)
    assert torch.equal(tok(TRICKY), open_clip.tokenize(TRICKY))  # start token kept, zero padding
    assert tok.vocab_size == 49408  # no <image> / <|endofchunk|> for CLIP


def test_media_tokens_only_when_asked(hf_clip_dir):
    with_media = Tokenizer(hf_clip_dir, 77, media_tokens=True)
    assert with_media.vocab_size == 49410
    assert {with_media.media_token_id, with_media.eoc_token_id} == {49408, 49409}
    assert with_media.encode(f"{MEDIA}a cat{EOC}")[0] == with_media.media_token_id
    with pytest.raises(ValueError, match="open_clip.*no <image>"):
        Tokenizer(kind="open_clip", media_tokens=True)
    with pytest.raises(ValueError, match="leave path empty"):
        Tokenizer(hf_clip_dir, kind="open_clip", media_tokens=False)
    with pytest.raises(ValueError, match="kind"):
        Tokenizer(hf_clip_dir, kind="sentencepiece")


def test_word_level_json_gets_media_tokens_only_when_asked(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    raw = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1, "cat": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = str(tmp_path / "tok.json")
    raw.save(path)
    plain = Tokenizer(path, 8, media_tokens=False)
    assert plain.media_token_id is None and plain.vocab_size == 5  # + <pad>, <eos>
    media = Tokenizer(path, 8, media_tokens=True)
    assert media.vocab_size == 7 and media.media_token_id is not None
    assert plain(["a cat"])[0].tolist() == [1, 2, plain.eos_token_id] + [plain.pad_token_id] * 5


def test_tokenizer_config_validation(tmp_path):
    base = f"task: clip\nout_dir: {tmp_path}/run\nmax_steps: 1\ndata: {{train: [{{shards: x.tar}}]}}\n"
    path = tmp_path / "c.yaml"
    path.write_text(base + "tokenizer: {type: open_clip, context_length: 77}\n")
    assert load_config(str(path)).tokenizer.type == "open_clip"
    path.write_text(base + "tokenizer: {context_length: 77}\n")
    with pytest.raises(ConfigError, match="tokenizer.path: required"):
        load_config(str(path))
    path.write_text(base + "tokenizer: {type: open_clip, path: tok.json}\n")
    with pytest.raises(ConfigError, match="bundled vocabulary"):
        load_config(str(path))
    path.write_text(base + "tokenizer: {type: bpe, path: tok.json}\n")
    with pytest.raises(ConfigError, match="tokenizer.type"):
        load_config(str(path))
