"""The fused SigLIP sigmoid loss: the Triton kernels against the plain-PyTorch reference.

Kernel tests put their tensors on the ``device`` fixture (CUDA when present, else CPU with the
kernels in the Triton interpreter; bf16 only with CUDA). Each compares the loss AND the gradients of
all four inputs (image, text, logit scale, logit bias) with the reference run on fp32 copies, with
``torch.empty`` NaN-poisoned so an element a kernel forgets to write fails. The interpreter cases are
a handful of (n, d, s, b) combinations that together cover n in {1, 7, 37, 300}, d in {1, 16, 96,
300, 768}, s in {1, 10, 100}, b in {-10, 0}, not the cross product (the CI machine has 2 cores).
"""

import pytest
import torch
import torch.nn.functional as F
import vlmcore.kernels.sigmoid_contrastive as module
from helpers.numerics import assert_close, run_sm90_compile_check, tolerance
from vlmcore.kernels import backend, sigmoid_contrastive_loss
from vlmcore.kernels.reference import sigmoid_contrastive_loss_reference

GRAD_NAMES = ("d_image", "d_text", "d_logit_scale", "d_logit_bias")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _features(n: int, d: int, dtype, device, n_text: int | None = None, noise: float = 0.8):
    """Unit-norm image rows and text rows correlated with them."""
    image = F.normalize(torch.randn(n, d, device=device), dim=1)
    n_text = n if n_text is None else n_text
    text = F.normalize(image[torch.arange(n_text, device=device) % n] + noise * torch.randn(n_text, d, device=device),
                       dim=1)
    return image.to(dtype), text.to(dtype)


def _run(image, text, scale, bias, backend_name, *, need=(True, True, True, True), **kwargs):
    """``(loss, d_image, d_text, d_scale, d_bias)`` of one forward + backward on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(flag) for t, flag in zip((image, text, scale, bias), need)]
    with backend(backend_name):
        out = sigmoid_contrastive_loss(*leaves, **kwargs)
    loss = out["loss"] if isinstance(out, dict) else out
    if any(need):
        loss.backward()
    return (loss, *(leaf.grad for leaf in leaves))


def _assert_grads_close(got, ref, dtype, names=GRAD_NAMES):
    atol, rtol = tolerance(dtype, grad=True)
    for name, g, r in zip(names, got, ref):
        if r is None:
            assert g is None, name
            continue
        assert_close(g, r, atol=atol * max(float(r.abs().max()), 1e-2), rtol=rtol, dtype=dtype, name=name)


def _check(image, text, scale, bias, **kwargs):
    got = _run(image, text, scale, bias, "triton", **kwargs)
    ref = _run(image.float(), text.float(), scale, bias, "reference", **kwargs)
    dtype = image.dtype
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    atol, rtol = tolerance(dtype)
    loss_atol = atol * max(1.0, float(ref[0].detach().abs()))
    assert_close(got[0], ref[0], atol=loss_atol, rtol=rtol, dtype=dtype, name="loss")
    for g, like in zip(got[1:], (image, text, scale, bias)):
        if g is not None:
            assert g.dtype == like.dtype and g.shape == like.shape
    _assert_grads_close(got[1:], ref[1:], dtype)
    return got


# (n, d, s, b): n = 1 (one pair), 7 (one tile), 37 (odd, one tile with masks), 300 (several row and
# column tiles); d = 1 and 300 below / across d tiles, 768 = the ViT-B width (tiny n: interpreter).
CASES = [(1, 1, 10.0, -10.0), (7, 16, 1.0, 0.0), (37, 96, 100.0, -10.0), (37, 300, 10.0, 0.0),
         (300, 16, 10.0, -10.0), (7, 768, 100.0, 0.0)]


@pytest.mark.parametrize("n,d,scale,bias", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, n, d, scale, bias, device, nan_poisoned_empty):
    image, text = _features(n, d, dtype, device)
    _check(image, text, torch.tensor(scale, device=device), torch.tensor(bias, device=device))


def test_several_windows(device, nan_poisoned_empty, monkeypatch):
    """G' windows smaller than the batch: rows split over windows, the text gradient summed over them."""
    monkeypatch.setattr(module, "WINDOW", 32)  # 3 x 3 windows of at most 32 x 32
    image, text = _features(70, 48, torch.float32, device)
    plan = module.sigmoid_contrastive_plan(70, 48, "fp32", device="interpreter" if device.type == "cpu" else "cuda")
    assert sum(launch.count for launch in plan.launches if launch.kernel == "_sigmoid_scores_kernel") == 9
    _check(image, text, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device))


def test_negatives_only(device, nan_poisoned_empty):
    image, text = _features(37, 16, torch.float32, device)
    _check(image, text, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device), negatives_only=True)


@pytest.mark.parametrize("need", [(False, True, True, True), (True, False, True, True), (False, False, True, False)])
def test_frozen_towers_skip_their_product(device, nan_poisoned_empty, monkeypatch, need):
    """A side that needs no gradient gets none and its product is never launched."""
    launched = []
    real_launch = module._launch

    def spy(kernel, grid, args, config, **constexprs):
        # the image product reads G' row-major (stride_am = window columns), the text one transposed (1)
        side = ("image" if args[7] != 1 else "text") if kernel.__name__ == "_window_matmul_kernel" else None
        launched.append((kernel.__name__, side))
        real_launch(kernel, grid, args, config, **constexprs)

    monkeypatch.setattr(module, "_launch", spy)
    image, text = _features(37, 16, torch.float32, device)
    got = _check(image, text, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device), need=need)
    assert (got[1] is None) == (not need[0]) and (got[2] is None) == (not need[1])
    assert (("_window_matmul_kernel", "image") in launched) == need[0]
    assert (("_window_matmul_kernel", "text") in launched) == need[1]


def test_no_grad_forward_writes_no_gradient_window(device, monkeypatch):
    """Under no_grad only the scores kernel runs, without G' (WRITE_G=False)."""
    launched = []
    real_launch = module._launch

    def spy(kernel, grid, args, config, **constexprs):
        launched.append((kernel.__name__, constexprs.get("WRITE_G")))
        real_launch(kernel, grid, args, config, **constexprs)

    monkeypatch.setattr(module, "_launch", spy)
    image, text = _features(37, 16, torch.float32, device)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    with torch.no_grad(), backend("triton"):
        loss = sigmoid_contrastive_loss(image.requires_grad_(), text, scale, bias)
    assert launched == [("_sigmoid_scores_kernel", False)]
    assert_close(loss, sigmoid_contrastive_loss_reference(image, text, scale, bias), dtype=torch.float32)


def test_group_ids(device, nan_poisoned_empty):
    """Several captions per image (equal ids are positives), also with more captions than images."""
    image, text = _features(12, 16, torch.float32, device, n_text=36)
    image_ids = torch.arange(12, device=device)
    text_ids = torch.arange(36, device=device) % 12  # three captions per image
    _check(image, text, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device),
           image_group_ids=image_ids, text_group_ids=text_ids)
    # duplicates on both sides, ids not sorted
    image, text = _features(37, 16, torch.float32, device)
    ids = torch.randint(0, 9, (37,), device=device)
    _check(image, text, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device),
           image_group_ids=ids, text_group_ids=ids.flip(0))


def test_unique_group_ids_equal_the_plain_loss(device):
    image, text = _features(37, 16, torch.float32, device)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    ids = torch.randperm(37, device=device) + 1000
    plain = _run(image, text, scale, bias, "triton")
    grouped = _run(image, text, scale, bias, "triton", image_group_ids=ids, text_group_ids=ids)
    for name, a, b in zip(("loss",) + GRAD_NAMES, plain, grouped):
        assert_close(a, b, atol=1e-6, rtol=1e-6, name=name)


def test_reference_matches_openclip_formula():
    """The oracle itself: OpenCLIP's ``SigLipLoss._loss`` written out (labels 2 I - 1, sum / n)."""
    image, text = _features(9, 16, torch.float32, "cpu")
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(9) - torch.ones(9, 9)
    expected = -F.logsigmoid(labels * logits).sum() / 9
    assert_close(sigmoid_contrastive_loss_reference(image, text, scale, bias), expected, atol=1e-6, rtol=1e-6)
    negatives = -F.logsigmoid(-logits).sum() / 9
    assert_close(sigmoid_contrastive_loss_reference(image, text, scale, bias, negatives_only=True), negatives,
                 atol=1e-6, rtol=1e-6)


def test_bit_identical_reruns(device):
    image, text = _features(100, 16, torch.float32, device)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    first = _run(image, text, scale, bias, "triton")
    second = _run(image, text, scale, bias, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gradient_scaled_by_the_incoming_gradient(device):
    """Gradients are formed in the forward for an upstream of 1; backward scales them (here by -2.5)."""
    image, text = _features(7, 16, torch.float32, device)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
    with backend("triton"):
        (sigmoid_contrastive_loss(*leaves) * -2.5).backward()
    ref = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
    (sigmoid_contrastive_loss_reference(*ref) * -2.5).backward()
    _assert_grads_close([t.grad for t in leaves], [t.grad for t in ref], torch.float32)


def test_plan_matches_the_launches(device, monkeypatch):
    """The launchers run exactly the grids of :func:`sigmoid_contrastive_plan` (the same function)."""
    monkeypatch.setattr(module, "WINDOW", 32)
    launched = []
    real_launch = module._launch

    def spy(kernel, grid, args, config, **constexprs):
        launched.append((kernel.__name__, tuple(grid)))
        real_launch(kernel, grid, args, config, **constexprs)

    monkeypatch.setattr(module, "_launch", spy)
    image, text = _features(70, 48, torch.float32, device)
    _run(image, text, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device), "triton")
    plan = module.sigmoid_contrastive_plan(70, 48, "fp32", device="interpreter" if device.type == "cpu" else "cuda")
    planned = sorted((launch.kernel, launch.grid) for launch in plan.launches for _ in range(launch.count))
    assert sorted(launched) == planned
    assert plan.useful_flops == 6 * 70 * 70 * 48 == plan.floor_flops


def test_plan_anchor_shapes():
    """6 n^2 d useful FLOPs, padding-free at the anchors, memory within the issue's 700 MB at 65536."""
    for n in (8192, 32768, 65536, 131072, 1048576):
        plan = module.sigmoid_contrastive_plan(n, 768, "bf16")
        assert plan.useful_flops == plan.floor_flops == 6 * n * n * 768
        assert plan.executed_flops == plan.useful_flops
        if n == 65536:
            gradients = 2 * n * 768 * 2
            assert plan.peak_extra_bytes + gradients <= 700e6
    frozen = module.sigmoid_contrastive_plan(8192, 768, "bf16", with_image=False)
    assert frozen.useful_flops == 4 * 8192 * 8192 * 768


def test_opcheck(device):
    image, text = _features(7, 16, torch.float32, device)
    scale, bias = torch.tensor(3.0, device=device), torch.tensor(-1.0, device=device)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4], device=device)
    op = torch.ops.vlmcore.sigmoid_contrastive_loss.default
    for args in ((None, None, module.POSITIVES_DIAGONAL, 0, 7, True, True, True),
                 (ids, ids, module.POSITIVES_IDS, 0, 7, True, False, True),
                 (None, None, module.POSITIVES_NONE, 0, 7, False, True, True)):
        leaves = [image.clone().requires_grad_(args[5]), text.clone().requires_grad_(args[6]),
                  scale.clone().requires_grad_(), bias.clone().requires_grad_()]
        torch.library.opcheck(op, (*leaves, *args))


def test_torch_compile(device):
    """The public function inside a fully compiled graph gives the eager values and gradients."""
    image, text = _features(9, 32, torch.float32, device)
    theta, bias = torch.tensor(2.0, device=device), torch.tensor(-10.0, device=device)

    def loss_fn(img, txt, th, b):
        return sigmoid_contrastive_loss(img, txt, th.exp(), b) * 3.0

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    eager_leaves = [t.clone().requires_grad_() for t in (image, text, theta, bias)]
    compiled_leaves = [t.clone().requires_grad_() for t in (image, text, theta, bias)]
    with backend("triton"):
        eager = loss_fn(*eager_leaves)
        got = compiled(*compiled_leaves)
    eager.backward()
    got.backward()
    assert_close(got, eager, atol=1e-6, rtol=1e-6, name="loss")
    for name, a, b in zip(GRAD_NAMES, compiled_leaves, eager_leaves):
        assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6, name=name)


@pytest.mark.interpreter
def test_bf16_refused_on_cpu_under_triton():
    image, text = _features(4, 16, torch.bfloat16, "cpu")
    with backend("triton"), pytest.raises(TypeError, match="image_features"):
        sigmoid_contrastive_loss(image, text, torch.tensor(10.0), torch.tensor(-10.0))


def test_bad_inputs():
    image, text = _features(4, 16, torch.float32, "cpu")
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    ids = torch.arange(4)
    cases = [
        ((image, text[:3], s, b), {}, ValueError, "same number of rows"),
        ((image, text[:, :8], s, b), {}, ValueError, "feature width"),
        ((image, text.half(), s, b), {}, TypeError, "text_features"),
        ((image, text, torch.tensor(float("inf")), b), {}, ValueError, "logit_scale"),
        ((image, text, s, torch.tensor(float("nan"))), {}, ValueError, "logit_bias"),
        ((image, text, s, torch.ones(2)), {}, ValueError, "logit_bias"),
        ((image, text, 10.0, b), {}, TypeError, "logit_scale"),
        ((image.long(), text, s, b), {}, TypeError, "image_features"),
        ((image, text, s, b), {"image_group_ids": ids}, ValueError, "together"),
        ((image, text, s, b), {"image_group_ids": ids, "text_group_ids": ids[:3]}, ValueError, "text_group_ids"),
        ((image, text, s, b), {"image_group_ids": ids.float(), "text_group_ids": ids}, TypeError, "image_group_ids"),
        ((image, text, s, b), {"dist_impl": "allreduce"}, ValueError, "dist_impl"),
        ((image, text, s, b), {"group": object()}, TypeError, "group must be a torch.distributed ProcessGroup"),
        ((image, text, s, b), {"negatives_only": 1}, TypeError, "negatives_only"),
    ]
    if torch.cuda.is_available():
        cases.append(((image, text.cuda(), s, b), {}, ValueError, "text_features"))
    else:
        cases.append(((image, text.to("meta"), s, b), {}, ValueError, "text_features"))
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            sigmoid_contrastive_loss(*args, **kwargs)


@pytest.mark.slow
def test_kernels_compile_for_h100():
    """Both kernels compile to sm_90a cubins (Triton's GPU passes + bundled ptxas, no GPU needed):
    16-bit products on tensor cores (wgmma), the preferred configs without register spills."""
    rows = run_sm90_compile_check("sigmoid_compile_check.py", timeout=900)
    assert {row["kernel"] for row in rows} == {"_sigmoid_scores_kernel", "_window_matmul_kernel"}
    for row in rows:
        assert row["spill_bytes"] == 0, row
        if row["dtype"] != "fp32":
            assert row["wgmma"] > 0, row


@pytest.mark.gpu
def test_gpu_bf16_large_n():
    n = 32768
    image, text = _features(n, 768, torch.bfloat16, "cuda", noise=1.0)
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    got = _run(image, text, scale, bias, "triton")
    ref = _run(image.float(), text.float(), scale, bias, "reference")
    assert_close(got[0], ref[0], atol=2e-2 * float(ref[0].abs()), rtol=0, name="loss")
    _assert_grads_close(got[1:], ref[1:], torch.bfloat16)


@pytest.mark.gpu
def test_gpu_memory_linear_in_n():
    """Peak extra memory of forward + backward (beyond inputs) stays within the plan's linear bound."""
    for n in (8192, 32768):
        image, text = (t.requires_grad_() for t in _features(n, 768, torch.bfloat16, "cuda"))
        scale = torch.tensor(10.0, device="cuda", requires_grad=True)
        bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sigmoid_contrastive_loss(image, text, scale, bias).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        plan = module.sigmoid_contrastive_plan(n, 768, "bf16")
        gradients = 2 * n * 768 * 2
        assert extra <= 1.25 * (plan.peak_extra_bytes + 2 * gradients), (n, extra)


@pytest.mark.gpu
@pytest.mark.parametrize("with_ids", [False, True])
def test_gpu_cuda_graph_capture(with_ids):
    """The eager loss never reads the scale or bias to the host: forward + backward run under
    ``set_sync_debug_mode("error")``, capture in a CUDA graph (impossible with a host sync), and a
    replay on new data equals an eager run on that data, bit for bit."""
    n, d = 4096, 256
    image, text = _features(n, d, torch.bfloat16, "cuda")
    static = [image.clone().requires_grad_(), text.clone().requires_grad_(),
              torch.tensor(10.0, device="cuda", requires_grad=True),
              torch.tensor(-10.0, device="cuda", requires_grad=True)]
    ids = torch.arange(n, device="cuda") // 2 if with_ids else None  # two captions per image

    def step():
        for leaf in static:
            leaf.grad = None
        loss = sigmoid_contrastive_loss(*static, image_group_ids=ids, text_group_ids=ids)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with backend("triton"), torch.cuda.stream(side):
        step()  # first-call compiles and allocations happen outside the checks
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with backend("triton"), torch.cuda.graph(graph):
        loss = step()
    new_image, new_text = _features(n, d, torch.bfloat16, "cuda")
    with torch.no_grad():
        static[0].copy_(new_image)
        static[1].copy_(new_text)
    graph.replay()
    torch.cuda.synchronize()
    eager = _run(new_image, new_text, static[2], static[3], "triton", image_group_ids=ids, text_group_ids=ids)
    assert torch.equal(loss, eager[0])
    for name, leaf, ref in zip(GRAD_NAMES, static, eager[1:]):
        assert torch.equal(leaf.grad, ref), name
