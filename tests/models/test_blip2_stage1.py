"""BLIP-2 stage 1: ITC / ITM / ITG losses, the hard-negative sampler, no host sync, 2 gloo ranks.

- The sampler never draws a positive and draws from the softmax of the similarities (a
  frequency test with a fixed seed).
- The losses equal a direct computation (LAVIS's formulas written out: loops over queries,
  ``F.cross_entropy(label_smoothing=0.1)``, the ITG loss from the joint causal pass).
- The loss path (forward and backward) runs with every host-reading tensor method patched to raise
  (CPU); on a GPU under ``torch.cuda.set_sync_debug_mode("error")``.
- Two gloo ranks with the index-based exchange of the chosen negatives give the same losses,
  negatives and (rank-averaged) gradients as one process on the whole batch with the same seed.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close
from helpers.workers.blip2_dist_worker import CASES, N_LOCAL, build, run
from vlmcore.kernels import backend

from vlmcore.blip2 import Blip2Stage1, fetch_rows, sample_hard_negatives

WORKER = Path(__file__).parents[1] / "helpers" / "workers" / "blip2_dist_worker.py"
WORLD = 2


def test_sampler_never_draws_a_positive_and_follows_the_softmax():
    gen = torch.Generator().manual_seed(5)
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0], [0.0, 3.0, 1.0, 1.0, -2.0]])
    positive = torch.tensor([[True, False, False, False, False], [False, True, False, True, False]])
    draws = 40000
    rows = logits.repeat_interleave(draws, dim=0)
    pos = positive.repeat_interleave(draws, dim=0)
    index, valid = sample_hard_negatives(rows, pos, torch.rand(rows.shape, generator=gen))
    assert valid.all()
    assert not pos.gather(1, index[:, None]).any(), "a positive was drawn"
    for r in range(2):
        counts = torch.bincount(index[r * draws:(r + 1) * draws], minlength=5).float()
        expected = torch.softmax(logits[r].masked_fill(positive[r], float("-inf")), dim=0) * draws
        # chi-square with <= 3 degrees of freedom; 16.3 is the 0.999 quantile for 3
        nonzero = expected > 0
        chi2 = ((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum()
        assert chi2 < 16.3, (counts, expected)
        assert (counts[~nonzero] == 0).all()
    _, valid = sample_hard_negatives(logits, torch.ones_like(positive), torch.rand(2, 5))
    assert not valid.any()


def _tiny(gather_with_grad=False):
    model, image, text, image_ids = build(2, gather_with_grad)  # 6 pairs in one process
    mask = torch.ones_like(text)
    mask[1, 4:] = 0
    mask[4, 3:] = 0
    return model, image, text, mask, image_ids


def _direct_itc(model, image, text, mask, label_smoothing=0.1):
    """LAVIS's ITC, written with a loop over the queries."""
    q_out = model.qformer.encode_image(image)
    img = F.normalize(model.vision_proj(q_out), dim=-1)  # [N, Q, e]
    txt = F.normalize(model.text_proj(model.qformer.encode_text(text, mask)[:, 0]), dim=-1)
    per_query = torch.stack([img[:, q] @ txt.T for q in range(img.shape[1])], dim=-1)  # [N_img, N_txt, Q]
    sim = per_query.max(dim=-1).values / model.temp
    targets = torch.arange(len(text))
    return (F.cross_entropy(sim, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim.T, targets, label_smoothing=label_smoothing)) / 2


def test_stage1_losses_equal_a_direct_computation():
    model, image, text, mask, _ = _tiny()
    model.eval()
    out = model(text_ids=text, attention_mask=mask, image_embeds=image, generator=torch.Generator().manual_seed(1))
    assert_close(out["loss_itc"], _direct_itc(model, image, text, mask), atol=1e-5, rtol=1e-5, name="itc")
    # ITG from the joint queries + text pass under the multimodal-causal mask
    dec = text.clone()
    dec[:, 0] = model.dec_token_id
    joint = model.qformer(image, dec, mask, mode="causal")[:, model.qformer.num_query_tokens:]
    logits = F.linear(model.lm_head_norm(F.gelu(model.lm_head_dense(joint))), model.qformer.word_embeddings.weight,
                      model.lm_head_bias)
    labels = text.masked_fill(mask == 0, -100)
    itg = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                          label_smoothing=0.1)
    assert_close(out["loss_itg"], itg, atol=1e-5, rtol=1e-5, name="itg")
    assert_close(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_itg"], atol=1e-6, rtol=1e-6)
    for key in ("itc_i2t_acc", "itc_t2i_acc", "itm_acc"):
        assert 0.0 <= float(out[key]) <= 1.0


def test_itm_pairs_use_negatives_that_are_never_positives():
    model, image, text, mask, image_ids = _tiny()
    fetched = []
    import vlmcore.blip2.stage1 as blip2

    def spy(local, index, group):
        fetched.append(index.clone())
        return fetch_rows(local, index, group)

    for ids in (None, image_ids):
        fetched.clear()
        blip2.fetch_rows, real = spy, blip2.fetch_rows
        try:
            model(text_ids=text, attention_mask=mask, image_embeds=image, image_ids=ids)
        finally:
            blip2.fetch_rows = real
        neg_image, neg_text = fetched[0], fetched[1]
        own = torch.arange(len(text))
        key = own if ids is None else ids
        assert (key[neg_image] != key).all() and (key[neg_text] != key).all()


def test_itm_loss_gets_no_weight_from_rows_without_a_negative():
    model, image, text, mask, _ = _tiny()
    same = torch.zeros(len(text), dtype=torch.long)  # every pair is positive: no negative exists
    out = model(text_ids=text, attention_mask=mask, image_embeds=image, image_ids=same)
    logits = model.itm_logits(image, text, mask)
    assert_close(out["loss_itm"], F.cross_entropy(logits, torch.ones(len(text), dtype=torch.long)), atol=1e-5,
                 rtol=1e-5)


_HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def test_loss_path_has_no_host_sync(monkeypatch):
    """Forward and backward with every tensor method that reads values on the host made to raise."""
    model, image, text, mask, image_ids = _tiny()
    model.train()

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called in the loss path")
        return method

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    for ids in (None, image_ids):
        with backend("reference"):
            out = model(text_ids=text, attention_mask=mask, image_embeds=image, image_ids=ids)
            out["loss"].backward()
    monkeypatch.undo()
    assert torch.isfinite(out["loss"]).item()
    assert model.qformer.query_tokens.grad is not None and model.temp.grad is not None


@pytest.mark.gpu
def test_loss_path_has_no_host_sync_on_cuda():
    model, image, text, mask, image_ids = _tiny()
    model = model.cuda()
    args = {"text_ids": text.cuda(), "attention_mask": mask.cuda(), "image_embeds": image.cuda()}
    model(**args)["loss"].backward()  # warm-up: lazy CUDA init and autotuning may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for ids in (None, image_ids.cuda()):
            model(**args, image_ids=ids)["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bad_inputs_name_the_argument():
    model, image, text, mask, _ = _tiny()
    with pytest.raises(ValueError, match="image_embeds must have width vision_width"):
        model(text_ids=text, image_embeds=torch.randn(len(text), 5, 17))
    with pytest.raises(ValueError, match="text_ids' batch"):
        model(text_ids=text, image_embeds=image[:2])
    with pytest.raises(ValueError, match="text_ids has length 17, longer than the position table"):
        model(text_ids=torch.ones(len(text), 17, dtype=torch.long), image_embeds=image)
    with pytest.raises(ValueError, match="image_ids must be"):
        model(text_ids=text, image_embeds=image, image_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of images and image_embeds"):
        model(text_ids=text)
    with pytest.raises(ValueError, match="dec_token_id"):
        Blip2Stage1(model.qformer, dec_token_id=10_000)
    with pytest.raises(TypeError, match="qformer"):
        Blip2Stage1(torch.nn.Linear(2, 2), dec_token_id=1)


def test_hf_retrieval_heads_load_by_name():
    from transformers import Blip2Config
    from transformers.models.blip_2.modeling_blip_2 import Blip2ForImageTextRetrieval

    config = Blip2Config(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 8, "patch_size": 4},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
                        "vocab_size": 40, "max_position_embeddings": 16, "use_qformer_text_input": True},
        num_query_tokens=4, image_text_hidden_size=8)
    hf = Blip2ForImageTextRetrieval(config)
    model, *_ = build(1, False)
    unused = model.load_hf_state_dict(hf.state_dict())
    assert all(k.startswith(("vision_model.", "embeddings.position_ids")) for k in unused), unused
    assert torch.equal(model.itm_head.weight, hf.itm_head.weight)
    assert torch.equal(model.vision_proj.bias, hf.vision_projection.bias)
    assert torch.equal(model.qformer.layers[1].ffn_query.fc2.weight,
                       hf.qformer.encoder.layer[1].output_query.dense.weight)
    bad = dict(hf.state_dict())
    bad["text_projection.weight"] = torch.zeros(9, 32)
    with pytest.raises(ValueError, match="text_projection.weight"):
        model.load_hf_state_dict(bad)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blip2_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", VLMCORE_BACKEND="reference")
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(rank), str(WORLD), str(tmp / "init"),
                          str(tmp / f"rank{rank}.pt")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD)
    ]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_gloo_ranks_match_one_process(rank_results, case):
    name, with_grad, use_ids = case
    model, image, text, image_ids = build(WORLD, with_grad)
    with backend("reference"):
        full = run(model, image, text, image_ids, use_ids)
    per_rank = [results[name] for results in rank_results]
    for key in ("loss", "loss_itc", "loss_itm", "loss_itg", "itc_i2t_acc", "itc_t2i_acc", "itm_acc"):
        mean = torch.stack([got[key] for got in per_rank]).mean()
        assert_close(mean, full[key], atol=1e-5, rtol=1e-5, name=f"rank-mean {key}")
    for key in ("negative_images", "negative_texts"):  # the exchange brought the same rows
        got = torch.cat([r[key] for r in per_rank])
        assert torch.equal(got, full[key]), key
    assert set(per_rank[0]["grads"]) == set(full["grads"])
    for param, expected in full["grads"].items():
        averaged = sum(r["grads"][param] for r in per_rank) / WORLD
        assert_close(averaged, expected, atol=1e-5, rtol=1e-4, name=f"averaged d {param}")
    assert N_LOCAL * WORLD == len(text)


def test_recall_at_k_ranks_like_retrieval_metrics():
    import vlmcore
    from vlmcore.blip2 import recall_at_k

    gen = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(7, 5, generator=gen), dim=1)
    txt = F.normalize(img.repeat_interleave(2, dim=0) + 0.8 * torch.randn(14, 5, generator=gen), dim=1)
    text_to_image = torch.arange(7).repeat_interleave(2)
    scores = img @ txt.T
    got = recall_at_k(scores, scores.T, text_to_image, ks=(1, 3))
    expected = vlmcore.retrieval_metrics(img, txt, text_to_image, ks=(1, 3))
    expected.pop("mean_recall")
    assert got == expected


def test_retrieval_scores_rerank_only_the_top_k():
    model, image, text, mask, _ = _tiny()
    model.eval()
    scores = model.retrieval_scores(image, text, mask, k=2, batch_size=4)
    itc, i2t, t2i = scores["itc"], scores["itm_i2t"], scores["itm_t2i"]
    assert itc.shape == (6, 6) and i2t.shape == (6, 6) and t2i.shape == (6, 6)
    top = itc.topk(2, dim=1).indices
    kept = i2t > -100
    assert kept.sum(dim=1).eq(2).all() and kept.gather(1, top).all()
    itm = model.itm_logits(image[:1].expand(2, -1, -1), text[top[0]], mask[top[0]])[:, 1]
    assert_close(i2t[0, top[0]], itm + itc[0, top[0]], atol=1e-5, rtol=1e-5)
    assert (t2i > -100).sum(dim=1).eq(2).all()


def test_recall_at_k_with_duplicate_captions_counts_them_as_positives():
    from vlmcore.blip2 import recall_at_k

    scores = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # captions 0 and 1 are the same
    positive = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert recall_at_k(scores, scores.T, positive=positive, ks=(1,)) == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}
    plain = recall_at_k(scores, scores.T, ks=(1,))  # ties with the duplicate rank pessimistically
    assert plain["i2t_R@1"] == pytest.approx(1 / 3) and plain["t2i_R@1"] == pytest.approx(1 / 3)
