"""The distributed SigLIP loss with 2 real gloo processes (ring and gather, reference and Triton).

The oracle runs here in one process, fp32: OpenCLIP's ``SigLipLoss(rank=r, world_size=W)`` semantics
written with the reference: rank r's loss = its local images against ALL text (positives: the local
diagonal, or equal group ids anywhere), divided by the LOCAL batch n. Each rank's loss is scaled by
its own factor u_r before backward, so the expected gradients are those of ``sum_r u_r L_r``; with
u_r = 1 the rank-mean of the gradients equals the one-process loss on the concatenated batch (the
normalization check below).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.numerics import assert_close
from helpers.workers.sigmoid_dist_worker import CASES, N_LOCAL, global_batch, upstream
from vlmcore.kernels.reference import sigmoid_contrastive_loss_reference

WORKER = Path(__file__).parents[1] / "helpers" / "workers" / "sigmoid_dist_worker.py"
WORLD = 2


def _rank_loss(image, text, ids, scale, bias, rank, with_ids):
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    if with_ids:
        return sigmoid_contrastive_loss_reference(image[rows], text, scale, bias, image_group_ids=ids[rows],
                                                  text_group_ids=ids)
    return sigmoid_contrastive_loss_reference(image[rows], text, scale, bias, positive_offset=rank * N_LOCAL)


def _expected(with_ids):
    image, text, ids, scale, bias = global_batch(WORLD)
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
    losses = [_rank_loss(*leaves[:2], ids, *leaves[2:], rank, with_ids) for rank in range(WORLD)]
    sum(loss * upstream(rank) for rank, loss in enumerate(losses)).backward()
    return [loss.detach() for loss in losses], [leaf.grad for leaf in leaves]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sigmoid_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), str(rank), str(WORLD), str(tmp / "init"), str(tmp / f"rank{rank}.pt")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_two_gloo_ranks_match_openclip_semantics(rank_results, case):
    _, _, with_ids, frozen_text = case
    losses, (d_image, d_text, d_scale, d_bias) = _expected(with_ids)
    per_rank = [results[case] for results in rank_results]
    for rank, got in enumerate(per_rank):
        assert_close(got["loss"], losses[rank], dtype=torch.float32, name=f"rank {rank} loss")
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        assert_close(got["d_image"], d_image[rows], dtype=torch.float32, grad=True, name=f"rank {rank} d_image")
        if frozen_text:
            assert got["d_text"] is None
        else:
            assert_close(got["d_text"], d_text[rows], dtype=torch.float32, grad=True, name=f"rank {rank} d_text")
    # logit scale / bias: each rank holds the gradient of its own loss; DDP sums (here) over ranks
    for key, expected in (("d_logit_scale", d_scale), ("d_logit_bias", d_bias)):
        total = torch.stack([got[key] for got in per_rank]).sum()
        assert_close(total, expected, dtype=torch.float32, grad=True, name=f"summed {key}")


def test_rank_mean_is_the_one_process_loss():
    """The normalization: OpenCLIP divides each rank's loss by the local batch, so the mean over ranks
    (what DDP's gradient averaging optimizes) is the one-process loss on the concatenated batch."""
    image, text, ids, scale, bias = global_batch(WORLD)
    for with_ids in (False, True):
        losses = [_rank_loss(image, text, ids, scale, bias, rank, with_ids) for rank in range(WORLD)]
        kwargs = {"image_group_ids": ids, "text_group_ids": ids} if with_ids else {}
        full = sigmoid_contrastive_loss_reference(image, text, scale, bias, **kwargs)
        assert_close(torch.stack(losses).mean(), full, atol=1e-6, rtol=1e-6, name="rank-mean loss")


@pytest.mark.distributed
def test_ring_posts_the_exchange_before_scoring(rank_results):
    """Forward: the next block's isend/irecv is posted, THEN the current block is scored, then waited
    on (W - 1 times), then the last block is scored; backward: one exchange per remote partial."""
    for results in rank_results:
        forward = ["post", "score", "wait", "wait"] * (WORLD - 1) + ["score"]
        backward = ["post", "wait", "wait"] * (WORLD - 1)
        assert results["ring_events"] == forward + backward
