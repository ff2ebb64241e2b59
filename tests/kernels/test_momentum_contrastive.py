"""ITC with momentum distillation (kernels/momentum_contrastive.py): the Triton kernels (interpreter on
CPU) against the plain-PyTorch reference, and the reference against BLIP's own formulation.

Values and gradients (online rows, temperature) are compared with the reference on fp32 copies,
with ``torch.empty`` NaN-poisoned, over odd shapes and a queue longer than the batch; without and
with image ids (BLIP retrieval's positives: duplicate ids in the batch, queue entries sharing a
batch id, empty-queue ids -100).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close, run_sm90_compile_check
from vlmcore.kernels import backend, momentum_contrastive_loss
from vlmcore.kernels.reference import momentum_contrastive_loss_reference, momentum_contrastive_rows_reference

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# (b, e, Q): odd sizes; no queue; queue much longer than the batch; one row.
SHAPES = [(5, 24, 37), (13, 16, 0), (6, 40, 150), (1, 16, 3)]


def _inputs(b, e, q, dtype, device, noise=0.5):
    """Online / momentum features (momentum = a perturbed copy, as after a few EMA steps) and queues."""
    def unit(x):
        return F.normalize(x, dim=1)

    image = unit(torch.randn(b, e, device=device))
    text = unit(image + noise * torch.randn(b, e, device=device))
    image_m = unit(image + 0.1 * torch.randn(b, e, device=device))
    text_m = unit(text + 0.1 * torch.randn(b, e, device=device))
    image_queue = unit(torch.randn(q, e, device=device)) if q else None
    text_queue = unit(torch.randn(q, e, device=device)) if q else None
    cast = [t.to(dtype) if t is not None else None for t in (image, text, image_m, text_m, image_queue, text_queue)]
    return cast


def _ids(b, q, device):
    """Image ids as BLIP retrieval sees them: duplicates in the batch (several captions of one image),
    queue entries that share a batch id, unrelated ids and -100 (an unfilled queue slot)."""
    g = torch.Generator().manual_seed(b * 1000 + q)
    # ids from 0, like COCO's: padded column / row lanes must not count as positives of image 0
    ids = torch.randint(0, max(1, (b + 1) // 2), (b,), generator=g)  # ~2 captions per image
    ids[0] = 0
    queue_ids = torch.randint(0, b + 8, (q,), generator=g)  # some equal a batch id, some not
    queue_ids[torch.rand(q, generator=g) < 0.3] = -100
    if q:
        queue_ids[0] = ids[0]  # at least one queue positive, whatever the draw
    return ids.to(device), (queue_ids.to(device) if q else None)


def _run(inputs, temperature, alpha, backend_name, ids=None, queue_ids=None, upstream=1.0):
    """``(loss, d_image, d_text, d_temperature)``; ``upstream``: the gradient the loss receives."""
    image, text, image_m, text_m, image_queue, text_queue = inputs
    image = image.detach().clone().requires_grad_()
    text = text.detach().clone().requires_grad_()
    temp = temperature.detach().clone().requires_grad_()
    with backend(backend_name):
        loss = momentum_contrastive_loss(image, text, image_m, text_m, temp, alpha, image_queue=image_queue,
                                         text_queue=text_queue, ids=ids, queue_ids=queue_ids)
    loss.backward(torch.tensor(upstream, device=loss.device))
    return loss, image.grad, text.grad, temp.grad


def _fp32(inputs):
    return [t.float() if t is not None else None for t in inputs]


@pytest.mark.parametrize("b,e,q", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference(b, e, q, dtype, device, nan_poisoned_empty):
    inputs = _inputs(b, e, q, dtype, device)
    temperature = torch.tensor(0.07, device=device)
    got = _run(inputs, temperature, 0.4, "triton")
    expected = _run(_fp32(inputs), temperature, 0.4, "reference")
    _assert_matches(got, expected, dtype)


def _assert_matches(got, expected, dtype):
    """Loss, row gradients of both modalities and the temperature gradient within ``dtype``'s tolerances."""
    assert got[0].dtype == torch.float32
    assert got[1].dtype == dtype
    assert_close(got[0], expected[0], dtype=dtype, name="loss")
    for name, g, r in zip(("d_image", "d_text"), got[1:3], expected[1:3]):
        atol = (2e-4 if dtype == torch.float32 else 5e-3) * float(r.abs().max())
        assert_close(g, r, dtype=dtype, grad=True, atol=atol, name=name)
    assert_close(got[3], expected[3], dtype=dtype, grad=True, name="d_temperature")


# (b, e, Q) with ids: a queue 25x the batch spread over several column tiles; no queue; one row.
ID_SHAPES = [(6, 40, 150), (13, 16, 0), (1, 16, 3)]


@pytest.mark.parametrize("b,e,q", ID_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference_with_ids(b, e, q, dtype, device, nan_poisoned_empty):
    inputs = _inputs(b, e, q, dtype, device)
    ids, queue_ids = _ids(b, q, device)
    temperature = torch.tensor(0.07, device=device)
    got = _run(inputs, temperature, 0.4, "triton", ids, queue_ids)
    expected = _run(_fp32(inputs), temperature, 0.4, "reference", ids, queue_ids)
    _assert_matches(got, expected, dtype)
    # the ids change the targets (else this test would not see an ignored id path)
    without_ids = _run(_fp32(inputs), temperature, 0.4, "reference")
    if b > 1 or q:
        assert not torch.allclose(without_ids[0], expected[0], rtol=1e-4, atol=0)


def _blip_magnitude_inputs(b, e, q, dtype, device):
    """Inputs whose per-element ``dL/dz = (p - t) g`` has BLIP's size (~3e-8) at a reduced shape.

    BLIP: p ~ 1 / 57,856 columns, g = 1 / (2 b) = 1 / 512 from the two directions' means. Here
    p ~ 1 / (b + q), so the loss receives the upstream gradient that makes ``p g`` equal. Columns
    share a direction (embeddings are anisotropic), so the negatives' sum ``sum_j p_ij c_j`` pulls as
    hard as the positive; online rows of norm 0.02 with temperature 0.01 keep the logits O(1) and
    the row gradients (~3e-4) in fp16's normal range. Returns ``(inputs, temperature, upstream)``.
    """
    shared = F.normalize(torch.randn(1, e, device=device), dim=1)

    def columns(n):
        return F.normalize(shared + 0.6 * F.normalize(torch.randn(n, e, device=device), dim=1), dim=1)

    image_m, text_m = columns(b), columns(b)
    image = 0.02 * F.normalize(image_m + 0.1 * torch.randn(b, e, device=device), dim=1)
    text = 0.02 * F.normalize(text_m + 0.1 * torch.randn(b, e, device=device), dim=1)
    inputs = [t.to(dtype) for t in (image, text, image_m, text_m, columns(q), columns(q))]
    upstream = (2 * b * (b + q)) / (2 * 256 * (256 + 57600))
    return inputs, torch.tensor(0.01, device=device), upstream


@pytest.mark.parametrize("with_ids", [False, True])
def test_fp16_negatives_keep_their_gradients_at_blip_magnitudes(with_ids, device, nan_poisoned_empty):
    """fp16 gradients within fp16 tolerance of the fp32 reference when each ``dL/dz`` is as small as
    at BLIP's shape: the kernel casts ``p - t`` to fp16 before the incoming gradient scales it (scaled
    first, the negatives' terms rounded to 0 and the row gradients were off by ~85%)."""
    b, e, q = 16, 32, 496
    inputs, temperature, upstream = _blip_magnitude_inputs(b, e, q, torch.float16, device)
    ids, queue_ids = _ids(b, q, device) if with_ids else (None, None)
    got = _run(inputs, temperature, 0.4, "triton", ids, queue_ids, upstream=upstream)
    expected = _run(_fp32(inputs), temperature, 0.4, "reference", ids, queue_ids, upstream=upstream)
    _assert_matches(got, expected, torch.float16)


def test_unique_ids_are_the_one_hot_targets(device):
    """All-distinct batch ids and an unfilled queue (-100): exactly the no-ids loss and gradients."""
    b, e, q = 7, 24, 19
    inputs = _inputs(b, e, q, torch.float32, device)
    temperature = torch.tensor(0.07, device=device)
    unique = torch.arange(b, device=device), torch.full((q,), -100, dtype=torch.int64, device=device)
    for name in ("triton", "reference"):
        with_ids = _run(inputs, temperature, 0.4, name, *unique)
        plain = _run(inputs, temperature, 0.4, name)
        for a, r in zip(with_ids, plain):
            assert torch.equal(a, r), name  # one positive, count 1: the same float operations


@pytest.mark.parametrize("with_ids", [False, True])
def test_reference_is_blip_itc_with_momentum_distillation(with_ids):
    """The reference (and the public API's reference path) against a transcription of BLIP's ITC block:
    ``blip_pretrain.py`` (one-hot targets) and, with ids, ``blip_retrieval.py`` (``idx`` / ``idx_queue``)."""
    b, e, q = 4, 16, 9
    image, text, image_m, text_m, image_queue, text_queue = _inputs(b, e, q, torch.float32, "cpu")
    temp, alpha = torch.tensor(0.1), 0.4
    idx = torch.tensor([3, 8, 3, 5])  # samples 0 and 2: two captions of one image
    idx_queue = torch.tensor([[5, -100, 3, 7, 3, -100, 8, 1, 2]])  # BLIP keeps the id queue as [1, Q]
    image_feat_all = torch.cat([image_m.t(), image_queue.t()], dim=1)  # BLIP keeps queues as [e, Q]
    text_feat_all = torch.cat([text_m.t(), text_queue.t()], dim=1)
    sim_i2t_m = image_m @ text_feat_all / temp
    sim_t2i_m = text_m @ image_feat_all / temp
    if with_ids:
        idx = idx.view(-1, 1)
        idx_all = torch.cat([idx.t(), idx_queue], dim=1)
        pos_idx = torch.eq(idx, idx_all).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    else:
        sim_targets = torch.zeros(sim_i2t_m.size())
        sim_targets.fill_diagonal_(1)
    sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
    sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image @ text_feat_all / temp
    sim_t2i = text @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    blip = (loss_i2t + loss_t2i) / 2
    ids = idx.view(-1) if with_ids else None
    ours = momentum_contrastive_loss_reference(image, text, image_m, text_m, torch.cat([image_m, image_queue]),
                                               torch.cat([text_m, text_queue]), temp, alpha, ids=ids,
                                               column_ids=torch.cat([ids, idx_queue[0]]) if with_ids else None)
    assert_close(ours, blip, atol=1e-6, rtol=1e-6, name="loss")
    with backend("reference"):
        public = momentum_contrastive_loss(image, text, image_m, text_m, temp, alpha, image_queue=image_queue,
                                           text_queue=text_queue, ids=ids,
                                           queue_ids=idx_queue[0] if with_ids else None)
    assert_close(public, blip, atol=1e-6, rtol=1e-6, name="loss (public API)")


def test_alpha_zero_is_plain_infonce_and_targets_get_no_gradient():
    rows, rows_m, cols = (F.normalize(torch.randn(n, 8), dim=1) for n in (3, 3, 7))
    temp = torch.tensor(0.2)
    ce = F.cross_entropy(rows @ cols.T / temp, torch.arange(3), reduction="none")
    assert_close(momentum_contrastive_rows_reference(rows, rows_m, cols, temp, 0.0), ce, atol=1e-6, rtol=1e-6)
    rows_m.requires_grad_()
    cols.requires_grad_()
    momentum_contrastive_rows_reference(rows, rows_m, cols, temp, 0.4).sum().backward()
    assert rows_m.grad is None  # targets are constants, as in BLIP (no_grad)


def test_deterministic(device):
    inputs = _inputs(37, 32, 75, torch.float32, device)
    temperature = torch.tensor(0.05, device=device)
    first = _run(inputs, temperature, 0.4, "triton")
    second = _run(inputs, temperature, 0.4, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bf16_refused_on_cpu_under_triton():
    inputs = _inputs(4, 16, 5, torch.bfloat16, "cpu")
    with backend("triton"), pytest.raises(TypeError, match="image_features"):
        momentum_contrastive_loss(*inputs[:4], torch.tensor(0.07), 0.4, image_queue=inputs[4], text_queue=inputs[5])


def test_bad_inputs_name_the_argument():
    image, text, image_m, text_m, image_queue, text_queue = _inputs(4, 16, 5, torch.float32, "cpu")
    temp = torch.tensor(0.07)
    with pytest.raises(ValueError, match="image_features_m"):
        momentum_contrastive_loss(image, text, image_m[:3], text_m, temp, 0.4)
    with pytest.raises(ValueError, match="text_queue"):
        momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, image_queue=image_queue,
                                  text_queue=text_queue[:, :8])
    with pytest.raises(ValueError, match="both"):
        momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, image_queue=image_queue)
    with pytest.raises(ValueError, match="alpha"):
        momentum_contrastive_loss(image, text, image_m, text_m, temp, 1.5)
    with pytest.raises(TypeError, match="temperature"):
        momentum_contrastive_loss(image, text, image_m, text_m, 0.07, 0.4)
    with pytest.raises(TypeError, match="text_features"):
        momentum_contrastive_loss(image, text.half(), image_m, text_m, temp, 0.4)
    wide = torch.randn(4, 300)
    with backend("triton"), pytest.raises(ValueError, match="e <= 256"):
        momentum_contrastive_loss(wide, wide, wide, wide, temp, 0.4)


def test_bad_ids_name_the_argument():
    image, text, image_m, text_m, image_queue, text_queue = _inputs(4, 16, 5, torch.float32, "cpu")
    temp = torch.tensor(0.07)
    ids, queue_ids = torch.tensor([1, 2, 1, 3]), torch.tensor([2, -100, 5, 1, -100])
    queues = dict(image_queue=image_queue, text_queue=text_queue)
    for name in ("reference", "triton"):
        with backend(name):
            with pytest.raises(TypeError, match="^ids must be an int64"):
                momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, ids=ids.int())
            with pytest.raises(TypeError, match=r"^ids must be an int64 tensor of shape \[4\]"):
                momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, ids=ids[:3])
            with pytest.raises(TypeError, match="^queue_ids must be"):  # queues given, their ids not
                momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, ids=ids, **queues)
            with pytest.raises(TypeError, match="^queue_ids must be"):
                momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, ids=ids, queue_ids=queue_ids[:4],
                                          **queues)
            with pytest.raises(TypeError, match="^queue_ids must be"):
                momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, ids=ids,
                                          queue_ids=queue_ids.float(), **queues)
            with pytest.raises(ValueError, match="queue_ids is given without ids"):
                momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, queue_ids=queue_ids, **queues)
            with pytest.raises(ValueError, match="queue_ids has 5 entries but there is no queue"):
                momentum_contrastive_loss(image, text, image_m, text_m, temp, 0.4, ids=ids, queue_ids=queue_ids)


@pytest.mark.parametrize("with_ids", [False, True])
def test_opcheck(with_ids):
    rows, rows_m, cols = (F.normalize(torch.randn(n, 16), dim=1) for n in (5, 5, 9))
    rows.requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)
    ids = (torch.tensor([4, 1, 4, 2, 7]), torch.tensor([4, 1, 4, 2, 7, 1, -100, 4, 3])) if with_ids else ()
    with backend("triton"):
        torch.library.opcheck(torch.ops.vlmcore.momentum_distill_rows, (rows, rows_m, cols, temp, 0.4, 0, *ids),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_with_and_without_ids():
    """The optional id tensors of the custom ops trace under ``torch.compile`` (graph breaks allowed):
    same loss and gradients as eager, with ids and without (a recompile for ``None``)."""
    inputs = _inputs(5, 16, 11, torch.float32, "cpu")
    temperature = torch.tensor(0.07)
    ids = _ids(5, 11, "cpu")

    def loss_and_grads(loss_fn, *id_args):
        image, text, temp = (t.detach().clone().requires_grad_() for t in (inputs[0], inputs[1], temperature))
        loss = loss_fn(image, text, temp, *id_args)
        loss.backward()
        return loss, image.grad, text.grad, temp.grad

    def loss_fn(image, text, temp, ids=None, queue_ids=None):
        return momentum_contrastive_loss(image, text, inputs[2], inputs[3], temp, 0.4, image_queue=inputs[4],
                                         text_queue=inputs[5], ids=ids, queue_ids=queue_ids)

    compiled = torch.compile(loss_fn, backend="aot_eager")
    with backend("triton"):
        for id_args in (ids, ()):
            for a, r in zip(loss_and_grads(compiled, *id_args), loss_and_grads(loss_fn, *id_args)):
                assert_close(a, r, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_blip_shape(dtype, with_ids):
    """BLIP's ITC shape (b = 256, 57,600 queued columns, e = 256, temperature 0.07, alpha 0.4) in 16-bit
    against the fp32 reference: here dL/dz per element is ~3e-8, below fp16's subnormals unless the
    kernel casts before scaling by the incoming gradient."""
    b, e, q = 256, 256, 57600
    inputs = _inputs(b, e, q, dtype, "cuda")
    ids, queue_ids = _ids(b, q, "cuda") if with_ids else (None, None)
    temperature = torch.tensor(0.07, device="cuda")
    got = _run(inputs, temperature, 0.4, "triton", ids, queue_ids)
    expected = _run(_fp32(inputs), temperature, 0.4, "reference", ids, queue_ids)
    _assert_matches(got, expected, dtype)


@pytest.mark.slow
def test_kernels_compile_for_h100():
    """Both kernels, with and without ids, compile to sm_90a cubins (Triton's GPU passes + bundled ptxas,
    no GPU needed); the 64-row tiles use wgmma and the bf16 variants spill at most a few bytes."""
    rows = run_sm90_compile_check("momentum_contrastive_compile_check.py", timeout=900)
    assert {(row["kernel"], row["config"]["HAS_IDS"]) for row in rows} == {
        (kernel, has_ids) for kernel in ("_momentum_distill_fwd_kernel", "_momentum_distill_bwd_kernel")
        for has_ids in (False, True)}
    for row in rows:
        if row["dtype"] != "fp32":
            assert row["wgmma"] + row["mma"] > 0, row
        if row["dtype"] == "bf16":
            assert row["spill_bytes"] <= 64, row
    assert any(row["wgmma"] > 0 for row in rows)


def test_bench_blip_quick_writes_rows_for_both_providers(tmp_path):
    import csv

    from vlmcore.bench.__main__ import main as bench_main

    out = tmp_path / "bench.csv"
    assert bench_main(["blip", "--quick", "--device", "cpu", "--modes", "fwd_bwd", "--out", str(out)]) == 0
    for op in ("blip_itc", "blip_itc_ids"):  # the second with BLIP retrieval's image-id positives
        rows = [r for r in csv.DictReader(open(out)) if r["op"] == op]
        assert {(r["provider"], r["status"]) for r in rows} == {("vlmcore", "ok"), ("reference", "ok")}, op
        assert len(rows) == 4, op
