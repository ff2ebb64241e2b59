"""``vlmcore-export``: a tiny run (through vlmcore-train) or a task-built model with trained-looking
weights -> the peer's format -> the peer's own model loads it with strict=True -> the same logits (fp32).

Also: an unknown format names the task's formats; the output directory must be empty."""

import pytest
import torch
from helpers.export_peers import (
    flamingo_overrides,
    openflamingo_model,
    openflamingo_training_checkpoint,
    trained_looking,
)
from helpers.numerics import assert_close
from helpers.training import read_metrics, train_argv
from vlmcore.train import main as train
from vlmcore.train.tasks.run_loader import build_run_model
from vlmcore.train.tools import export

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def data(shapes_dataset):
    return shapes_dataset(n_train=64, n_eval=16, n_docs=16, image_size=32, shard_size=32, seed=4)


@pytest.fixture(scope="module")
def flamingo_run(data, tmp_path_factory):
    """A 2-step Flamingo run (open_clip tower, OpenFlamingo's bridge sizes) started from an OpenFlamingo
    checkpoint with trained-looking weights (``model.flamingo.init``)."""
    tmp = tmp_path_factory.mktemp("flamingo_export")
    argv = train_argv("flamingo", data, tmp / "run", "max_steps=2", "save_every=0", eval_batch_size=None,
                      train_batch_size=4, context_length=12, vision=None) + flamingo_overrides(data)
    from vlmcore.train.config import load_config
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.tasks import get_task

    cfg = load_config(argv[1], argv[2:])
    torch.manual_seed(0)
    source = get_task("flamingo")(cfg, Tokenizer(cfg.tokenizer.path, 12)).build_model(torch.float32)
    trained_looking(source, [n for n, p in source.named_parameters() if p.requires_grad])
    openflamingo_training_checkpoint(source, tmp / "init.pt")
    train(argv + [f"model.flamingo.init={tmp}/init.pt"])
    return tmp / "run", source


@pytest.mark.slow  # the 2-step run: ~3 min on the shared 2-core machine (DeepSpeed's CPU op build included)
def test_flamingo_run_exports_to_openflamingo(flamingo_run, tmp_path, monkeypatch):
    run_dir, source = flamingo_run
    steps, _ = read_metrics(run_dir)
    assert [s["step"] for s in steps] == [1, 2]
    files = export.main(["--run", str(run_dir), "--to", "openflamingo", "--out", str(tmp_path / "of")])
    assert files == ["checkpoint.pt"]
    task, ours = build_run_model(str(run_dir))
    ours.eval()
    # trained: the bridge moved away from the init checkpoint in the 2 steps
    assert not torch.equal(ours.perceiver.latents, source.perceiver.latents)
    peer = openflamingo_model(monkeypatch, ours.lang_model.config, media_token_id=task.tok.media_token_id,
                              eoc_token_id=task.tok.eoc_token_id)
    state = torch.load(tmp_path / "of" / "checkpoint.pt", weights_only=True)["model_state_dict"]
    peer.load_state_dict(state, strict=True)
    lang_x = torch.randint(4, task.tok.vocab_size, (2, 9))
    lang_x[:, [0, 5]] = task.tok.media_token_id
    lang_x[1, 0] = 5  # text before the first image: attends to nothing
    vision_x, mask = torch.randn(2, 2, 1, 3, 16, 16), torch.ones_like(lang_x)
    mask[1, -2:] = 0
    with torch.no_grad():
        expected = peer(vision_x, lang_x, attention_mask=mask).logits
        got = ours(vision_x, lang_x, attention_mask=mask).logits
    assert_close(got, expected, name="logits", atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_unknown_format_and_used_output_directory_are_refused(flamingo_run, tmp_path):
    run_dir, _ = flamingo_run
    with pytest.raises(export.ExportError, match=r"no export format 'hf' \(its formats: openflamingo\)"):
        export.main(["--run", str(run_dir), "--to", "hf", "--out", str(tmp_path / "a")])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(export.ExportError, match="--out.*not empty"):
        export.main(["--run", str(run_dir), "--to", "openflamingo", "--out", str(tmp_path / "b")])
    with pytest.raises(export.ExportError, match="--run.*no config.json"):
        export.main(["--run", str(tmp_path), "--to", "openflamingo", "--out", str(tmp_path / "c")])


def _flamingo_task(data, tmp_path, *extra):
    from vlmcore.train.config import load_config
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.tasks import get_task

    argv = train_argv("flamingo", data, tmp_path / "run", eval_batch_size=None, context_length=12,
                      vision=None) + flamingo_overrides(data) + list(extra)
    cfg = load_config(argv[1], argv[2:])
    return get_task("flamingo")(cfg, Tokenizer(cfg.tokenizer.path, 12))


def test_flamingo_writer_round_trips_a_task_built_model(data, tmp_path, monkeypatch):
    # The writer alone (the CLI path is the slow test above), with trained new-token embeddings too.
    task = _flamingo_task(data, tmp_path, "model.flamingo.train_new_token_embeddings=true")
    ours = task.build_model(torch.float32).eval()
    trained_looking(ours, [n for n, p in ours.named_parameters() if p.requires_grad], seed=3)
    task.peer_exporters()["openflamingo"](ours, str(tmp_path))
    peer = openflamingo_model(monkeypatch, ours.lang_model.config, media_token_id=task.tok.media_token_id,
                              eoc_token_id=task.tok.eoc_token_id)
    peer.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model_state_dict"], strict=True)
    lang_x = torch.randint(4, task.tok.vocab_size, (2, 9))
    lang_x[:, [1, 6]] = task.tok.media_token_id
    lang_x[0, 8] = task.tok.eoc_token_id
    vision_x = torch.randn(2, 2, 1, 3, 16, 16)
    with torch.no_grad():
        assert_close(ours(vision_x, lang_x).logits, peer(vision_x, lang_x).logits, name="logits", atol=1e-5, rtol=1e-5)


def test_flamingo_writer_refuses_sizes_openflamingo_cannot_build(data, tmp_path):
    task = _flamingo_task(data, tmp_path, "model.flamingo.heads=4")
    with pytest.raises(ValueError, match=r"model.flamingo: .*heads=4 \(OpenFlamingo: 8\)"):
        task.peer_exporters()["openflamingo"](None, str(tmp_path))


def _blip2_argv(data, tmp_path, *extra, train_batch_size=None):
    """vlmcore-train arguments of a blip2_stage2 run started from a tiny HF BLIP-2 directory (written here)."""
    from helpers.tiny_blip2 import IMAGE_SIZE, tiny_hf_blip2
    from vlmcore.train.data.tokenizer import Tokenizer

    tok = Tokenizer(f"{data}/tokenizer.json", 12)
    tiny_hf_blip2(tok.vocab_size, tok.media_token_id, seed=6).save_pretrained(tmp_path / "hf")
    init = [f"model.blip2_stage2={{init: '{tmp_path / 'hf'}'}}", "model.lm=null",
            f"model.vision={{image_size: {IMAGE_SIZE}, freeze: true}}"]
    return train_argv("blip2_stage2", data, tmp_path / "run", *init, *extra, eval_batch_size=None,
                      train_batch_size=train_batch_size, context_length=12, vision=None)


def _assert_hf_blip2_matches(ours, out_dir, tok):
    """``out_dir`` loads into HF's ``Blip2ForConditionalGeneration`` with no missing / unexpected key and
    gives ``ours``' logits."""
    from helpers.tiny_blip2 import caption_batch
    from transformers import Blip2ForConditionalGeneration

    peer, info = Blip2ForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    images, input_ids, mask, _ = caption_batch(tok.vocab_size, tok.media_token_id, seed=3)
    with torch.no_grad():
        expected = peer.eval()(pixel_values=images, input_ids=input_ids, attention_mask=mask).logits
        assert_close(ours(images, input_ids, mask).logits, expected, name="logits", atol=1e-5, rtol=1e-5)


def test_blip2_hf_writer_round_trips_a_task_built_model(data, tmp_path):
    from vlmcore.train.config import load_config
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.tasks import get_task

    argv = _blip2_argv(data, tmp_path)
    cfg = load_config(argv[1], argv[2:])
    task = get_task("blip2_stage2")(cfg, Tokenizer(cfg.tokenizer.path, 12))
    ours = task.build_model(torch.float32).eval()
    trained_looking(ours, [n for n, p in ours.named_parameters() if p.requires_grad], seed=2)
    task.peer_exporters()["hf"](ours, str(tmp_path / "hf_out"))
    _assert_hf_blip2_matches(ours, tmp_path / "hf_out", task.tok)


@pytest.mark.slow  # a 2-step vlmcore-train run (DeepSpeed's CPU op build included on a fresh machine)
def test_blip2_run_from_hf_init_exports_to_hf(data, tmp_path):
    argv = _blip2_argv(data, tmp_path, "max_steps=2", "save_every=0", train_batch_size=4)
    train(argv)
    steps, _ = read_metrics(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2]
    files = export.main(["--run", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf_out")])
    assert "config.json" in files and "model.safetensors" in files
    task, ours = build_run_model(str(tmp_path / "run"))
    _assert_hf_blip2_matches(ours.eval(), tmp_path / "hf_out", task.tok)


def _blip2_stage1_argv(data, tmp_path, *extra, train_batch_size=None):
    """vlmcore-train arguments of a blip2_stage1 run from a tiny HF Blip2ForImageTextRetrieval (written here)."""
    from helpers.tiny_blip2 import IMAGE_SIZE, tiny_hf_blip2_retrieval
    from vlmcore.train.data.tokenizer import Tokenizer

    tok = Tokenizer(f"{data}/tokenizer.json", 12, media_tokens=False)
    tiny_hf_blip2_retrieval(tok.vocab_size + 2, seed=6).save_pretrained(tmp_path / "hf")  # + [CLS], [DEC]
    init = [f"model.blip2_stage1={{init: '{tmp_path / 'hf'}'}}",
            f"model.vision={{image_size: {IMAGE_SIZE}, freeze: true}}"]
    return train_argv("blip2_stage1", data, tmp_path / "run", *init, *extra, eval_batch_size=None,
                      train_batch_size=train_batch_size, context_length=12, vision=None)


def _assert_hf_blip2_stage1_matches(ours, out_dir, text):
    """``out_dir`` loads into HF's ``Blip2ForImageTextRetrieval`` with no missing / unexpected key and gives
    ``ours``' ITM logits and ITC similarities."""
    from helpers.tiny_blip2 import hf_retrieval_outputs, retrieval_batch, stage1_outputs
    from transformers import Blip2ForImageTextRetrieval

    peer, info = Blip2ForImageTextRetrieval.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    images, text_ids, mask = retrieval_batch(text.vocab_size, seed=3)
    text_ids[:, 0] = text.cls_token_id
    (itm, itc), (hf_itm, hf_itc) = stage1_outputs(ours, images, text_ids, mask), hf_retrieval_outputs(
        peer.eval(), images, text_ids, mask)
    assert_close(itm, hf_itm, name="ITM logits", atol=1e-5, rtol=1e-5)
    assert_close(itc, hf_itc, name="ITC similarities", atol=1e-5, rtol=1e-5)


def test_blip2_stage1_hf_writer_round_trips_a_task_built_model(data, tmp_path):
    from vlmcore.train.config import load_config
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.tasks import get_task

    argv = _blip2_stage1_argv(data, tmp_path)
    cfg = load_config(argv[1], argv[2:])
    task = get_task("blip2_stage1")(cfg, Tokenizer(cfg.tokenizer.path, 12, media_tokens=False))
    ours = task.build_model(torch.float32).eval()
    trained_looking(ours, [n for n, p in ours.named_parameters() if p.requires_grad], seed=2)
    task.peer_exporters()["hf"](ours, str(tmp_path / "hf_out"))
    _assert_hf_blip2_stage1_matches(ours, tmp_path / "hf_out", task.text)


def test_blip2_stage1_hf_writer_refuses_the_builtin_tower(data, tmp_path):
    from vlmcore.train.config import load_config
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.tasks import get_task

    argv = train_argv("blip2_stage1", data, tmp_path / "run", eval_batch_size=None, context_length=12, vision=None)
    cfg = load_config(argv[1], argv[2:])
    task = get_task("blip2_stage1")(cfg, Tokenizer(cfg.tokenizer.path, 12, media_tokens=False))
    with pytest.raises(ValueError, match="export to hf: HF BLIP-2 holds a Blip2VisionModel.*VisionTransformer"):
        task.peer_exporters()["hf"](task.build_model(torch.float32), str(tmp_path / "hf_out"))


@pytest.mark.slow  # a 2-step vlmcore-train run (DeepSpeed's CPU op build included on a fresh machine)
def test_blip2_stage1_run_from_hf_init_exports_to_hf(data, tmp_path):
    train(_blip2_stage1_argv(data, tmp_path, "max_steps=2", "save_every=0", train_batch_size=4))
    steps, _ = read_metrics(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2]
    files = export.main(["--run", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf_out")])
    assert "config.json" in files and "model.safetensors" in files
    task, ours = build_run_model(str(tmp_path / "run"))
    from safetensors.torch import load_file

    source = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert not torch.equal(ours.itm_head.weight, source["itm_head.weight"])  # trained in the 2 steps
    _assert_hf_blip2_stage1_matches(ours.eval(), tmp_path / "hf_out", task.text)


def _vilbert_task_and_argv(regions, tmp_path, *extra):
    """(task, vlmcore-train arguments) of a tiny ViLBERT on the region shapes with vilbert-multi-task's ReLU pooler."""
    from vlmcore.train.config import load_config
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.tasks import get_task

    sizes = ("model.vilbert={v_feature_size: 32, hidden_size: 32, intermediate_size: 48, num_attention_heads: 2, "
             "v_hidden_size: 24, v_intermediate_size: 40, v_num_attention_heads: 2, bi_hidden_size: 16, "
             "bi_num_attention_heads: 2, max_regions: 8, pooler_activation: relu}")
    argv = train_argv("vilbert", regions, tmp_path / "run", f"data.train.0.shards={regions}/regions-train-000000.tar",
                      "data.train.0.batch_size=8", "data.train.0.shuffle_buffer=0", sizes, *extra,
                      eval_batch_size=None, vision=None)
    cfg = load_config(argv[1], argv[2:])
    return get_task("vilbert")(cfg, Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length)), argv


def _vilbert_batch(model):
    c = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, c.vocab_size, (2, 6), generator=g)
    boxes = torch.rand(2, 5, 5, generator=g) * 0.5
    return ids, torch.randn(2, 5, c.v_feature_size, generator=g), boxes, torch.ones_like(ids)


def test_vilbert_writer_refuses_what_vilbert_multitask_cannot_build(regions, tmp_path):
    task, _ = _vilbert_task_and_argv(regions, tmp_path, "model.vilbert.pooler_activation=tanh")
    with pytest.raises(ValueError, match=r"model\.vilbert\.pooler_activation: 'tanh'"):
        task.peer_exporters()["vilbert_multitask"](task.build_model(torch.float32), str(tmp_path))
    assert not list(tmp_path.glob("*.bin"))
    task, _ = _vilbert_task_and_argv(regions, tmp_path, f"model.vilbert.init={tmp_path}/absent.bin")
    with pytest.raises(ValueError, match=r"model\.vilbert\.init: .*absent\.bin' does not exist"):
        task.build_model(torch.float32)


@pytest.mark.slow  # a 2-step vlmcore-train run (DeepSpeed's CPU op build included on a fresh machine)
def test_vilbert_run_from_init_exports_to_vilbert_multitask(regions, tmp_path):
    import json

    from vlmcore.vilbert import ViLBERT
    from vlmcore.vilbert_convert import load_vilbert_multitask_state_dict, vilbert_multitask_state_dict

    task, argv = _vilbert_task_and_argv(regions, tmp_path, "max_steps=2", "save_every=0")
    source = task.build_model(torch.float32)
    trained_looking(source, [n for n, _ in source.named_parameters()])
    # as vilbert-multi-task saves under DataParallel: "module."-prefixed keys
    torch.save({f"module.{k}": v for k, v in vilbert_multitask_state_dict(source).items()}, tmp_path / "init.bin")
    train(argv + [f"model.vilbert.init={tmp_path}/init.bin"])
    steps, _ = read_metrics(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2]
    (tmp_path / "init.bin").unlink()  # the run's exported file holds the whole model: init is not read again
    files = export.main(["--run", str(tmp_path / "run"), "--to", "vilbert_multitask", "--out", str(tmp_path / "vm")])
    assert files == ["config.json", "pytorch_model.bin"]
    _, ours = build_run_model(str(tmp_path / "run"))
    ours.eval()
    # started from the init (every weight within 2 small warm-up steps of it) and trained (moved)
    source_state = source.state_dict()
    assert max(float((v - source_state[k]).abs().max()) for k, v in ours.state_dict().items()) < 0.01
    assert not torch.equal(ours.alignment_head.weight, source.alignment_head.weight)
    config = json.loads((tmp_path / "vm" / "config.json").read_text())
    assert (config["hidden_size"], config["v_hidden_size"], config["bi_hidden_size"]) == (32, 24, 16)
    assert config["t_biattention_id"] == [1, 2] and config["v_target_size"] == ours.config.v_target_size
    back = ViLBERT(ours.config).eval()
    load_vilbert_multitask_state_dict(back, torch.load(tmp_path / "vm" / "pytorch_model.bin", weights_only=True))
    ids, feats, boxes, mask = _vilbert_batch(ours)
    with torch.no_grad():
        want, got = ours(ids, feats, boxes, mask), back(ids, feats, boxes, mask)
    for name in ("pooled_text", "pooled_visual", "alignment_logits", "mlm_logits"):
        assert torch.equal(got[name], want[name]), name
