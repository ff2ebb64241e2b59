"""The contrastive launch plan (``contrastive_plan``, the decisions the launchers make) against what
actually runs: on small shapes in the Triton interpreter, every kernel's launch count and its
``tl.dot`` block products (the plan's ``tiles``) are counted by instrumenting the interpreter
itself, and must equal the plan. Also the plan's headline numbers at the ANCHORS shapes and the
``bench plan`` command."""

import contextlib
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import vlmcore.kernels.contrastive as module
from vlmcore.kernels import backend, contrastive_loss

pytestmark = pytest.mark.skipif(not module.interpreter_enabled(), reason="counts the Triton interpreter's work")


@contextlib.contextmanager
def interpreter_counts():
    """``(launches, dots)``: Counters by kernel name of grid launches and of ``tl.dot`` calls, from
    the interpreter's grid executor and its builder's ``create_dot``."""
    from triton.runtime import interpreter

    launches, dots, running = Counter(), Counter(), []
    real_call = interpreter.GridExecutor.__call__
    builder = interpreter.interpreter_builder
    real_dot = builder.create_dot

    def call(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        running.append(self.fn.__name__)
        try:
            return real_call(self, *args, **kwargs)
        finally:
            running.pop()

    def dot(*args, **kwargs):
        dots[running[-1]] += 1
        return real_dot(*args, **kwargs)

    interpreter.GridExecutor.__call__ = call
    builder.create_dot = dot
    try:
        yield launches, dots
    finally:
        interpreter.GridExecutor.__call__ = real_call
        del builder.create_dot


def _planned(plan):
    launches, tiles = Counter(), Counter()
    for launch in plan.launches:
        if launch.kernel.startswith("_contrastive"):
            launches[launch.kernel] += launch.count
            if launch.tiles:
                tiles[launch.kernel] += launch.tiles * launch.count
    return launches, tiles


def _features(n, d, generator):
    image = F.normalize(torch.randn(n, d, generator=generator), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(n, d, generator=generator), dim=1)
    return image, text


CASES = [
    # (id, n, d, limits, frozen, accuracy, backward expected)
    ("register", 130, 48, {}, None, True, "register"),
    ("window-chunks", 300, 96, {"REGISTER_BACKWARD_MAX_D": 0, "WINDOW_MAX_COLS": 128, "WINDOW_BYTES": 128 * 300 * 4},
     None, False, "window"),
    ("window-frozen-text", 130, 320, {}, "text", False, "window"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_plan_tiles_equal_the_interpreters(case, monkeypatch, nan_poisoned_empty):
    _, n, d, limits, frozen, accuracy, expected = case
    for name, value in limits.items():
        monkeypatch.setattr(module, name, value)
    image, text = _features(n, d, torch.Generator().manual_seed(n))
    leaves = [image.requires_grad_(frozen != "image"), text.requires_grad_(frozen != "text"),
              torch.tensor(30.0, requires_grad=True)]
    plan = module.contrastive_plan(n, d, "fp32", accuracy=accuracy, with_cols=frozen is None, interpreter=True)
    assert any(note.startswith(f"backward: {expected}") for note in plan.notes), plan.notes
    with backend("triton"), interpreter_counts() as (launches, dots):
        out = contrastive_loss(*leaves, output_dict=accuracy)
        (out["loss"] if accuracy else out).backward()
    planned_launches, planned_tiles = _planned(plan)
    assert dict(launches) == dict(planned_launches)
    assert dict(dots) == dict(planned_tiles)


def test_rows_op_plan_matches(monkeypatch, nan_poisoned_empty):
    """The one-direction (local-loss) op: 64 rows against 192 columns, label offset 64."""
    generator = torch.Generator().manual_seed(3)
    cols = F.normalize(torch.randn(192, 96, generator=generator), dim=1).requires_grad_()
    rows = F.normalize(torch.randn(64, 96, generator=generator), dim=1).requires_grad_()
    plan = module.contrastive_plan(64, 96, "fp32", n_cols=192, symmetric=False, interpreter=True)
    with interpreter_counts() as (launches, dots):
        loss, _, _ = torch.ops.vlmcore.contrastive_loss_rows(rows, cols, torch.tensor(20.0), 0.0, 64, False)
        loss.backward()
    planned_launches, planned_tiles = _planned(plan)
    assert dict(launches) == dict(planned_launches) and dict(dots) == dict(planned_tiles)


@pytest.mark.parametrize("n", [32768, 2**20])
def test_anchor_plans_reach_the_flop_floor_with_one_window(n):
    """Done-when numbers of issue 11: executed FLOPs = 8 n^2 d (+ <= 3% padding) and one G' window
    of at most WINDOW_BYTES alive; at n = 32768 peak extra memory with the gradients <= 300 MB."""
    plan = module.contrastive_plan(n, 768, "bf16")
    floor = 8 * n * n * 768
    assert plan.floor_flops == floor and floor <= plan.executed_flops <= 1.03 * floor
    choice = module._choose(n, n, 768, torch.bfloat16, symmetric=True, accuracy=False, with_cols=True,
                            interpreter=False)
    assert choice.backward == "window"
    assert choice.window_rows * choice.window_cols * 2 <= module.WINDOW_BYTES
    if n == 32768:
        with_grads = plan.peak_extra_bytes + 2 * n * 768 * 2
        assert with_grads <= 300 * 2**20, with_grads / 2**20


def test_register_backward_only_where_predicted_faster():
    """Small d at small n: the register backward (fewer launches, no G' traffic); d above
    REGISTER_BACKWARD_MAX_D always the window backward."""
    small = module._choose(4096, 4096, 64, torch.bfloat16, symmetric=True, accuracy=False, with_cols=True,
                           interpreter=False)
    large = module._choose(4096, 4096, 768, torch.bfloat16, symmetric=True, accuracy=False, with_cols=True,
                           interpreter=False)
    assert (small.backward, large.backward) == ("register", "window")
    times = [module.contrastive_plan(4096, 64, backward=path, mode="bwd").predicted_ms(807e12, 3e12)[0]
             for path in ("register", "window")]
    assert times[0] <= times[1]


def test_bench_plan_command(capsys):
    from vlmcore.bench.__main__ import main

    assert main(["plan", "--op", "contrastive", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["shape"]["n"] for row in rows] == [8192, 32768, 65536, 131072, 1048576]
    for row in rows:
        n = row["shape"]["n"]
        assert row["executed_flops"] <= 1.03 * 8 * n * n * 768
        low, high = row["predicted_ms"]
        assert 0 < low < high
    fwd = [launch for launch in rows[1]["launches"] if launch["kernel"] == "_contrastive_fwd_kernel"]
    assert fwd[0]["evidence"] and fwd[0]["evidence"]["ctas_per_sm"] >= 2 and fwd[0]["evidence"]["spill_bytes"] == 0
    with pytest.raises(SystemExit):
        main(["plan", "--op", "nope"])
