"""The distributed contrastive loss with 2 real gloo processes, through the reference and the
Triton kernels (compiled, both ranks on the one GPU, when CUDA is present; else CPU tensors and the
interpreter). The one-process oracle runs here, on CPU, in fp32.

OpenCLIP semantics (``gather_with_grad=True``): ``local_loss=False`` gives every rank the global
loss; ``local_loss=True`` gives rank r the loss of its rows against all gathered columns, labels
offset by r * n. Either way, the rank-averaged gradients (what DDP applies) of the features and of
the logit scale equal the one-process loss's gradients on the concatenated batch.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.numerics import assert_close
from helpers.workers.contrastive_dist_worker import CASES, IDS_CASES, LABEL_SMOOTHING, N_LOCAL, global_batch, global_ids
from vlmcore.kernels.reference import (
    contrastive_accuracy_reference,
    contrastive_loss_multi_positive_reference,
    contrastive_loss_reference,
)

WORKER = Path(__file__).parents[1] / "helpers" / "workers" / "contrastive_dist_worker.py"
WORLD = 2


def _one_process(image, text, scale):
    """Loss, accuracies and gradients of the reference on the whole batch in one process."""
    leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    loss = contrastive_loss_reference(*leaves, label_smoothing=LABEL_SMOOTHING)
    loss.backward()
    i2t, t2i = contrastive_accuracy_reference(image, text)
    return {"loss": loss.detach(), "i2t_acc": i2t, "t2i_acc": t2i,
            "d_image": leaves[0].grad, "d_text": leaves[1].grad, "d_logit_scale": leaves[2].grad}


def _rank_values(image, text, scale, rank):
    """Rank ``rank``'s OpenCLIP ``local_loss=True`` loss and accuracies (rows vs all columns)."""
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    kwargs = {"label_offset": rank * N_LOCAL, "all_image_features": image, "all_text_features": text}
    loss = contrastive_loss_reference(image[rows], text[rows], scale, label_smoothing=LABEL_SMOOTHING, **kwargs)
    i2t, t2i = contrastive_accuracy_reference(image[rows], text[rows], **kwargs)
    return {"loss": loss, "i2t_acc": i2t, "t2i_acc": t2i}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contrastive_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(WORLD), str(tmp / "init"), str(tmp / f"rank{rank}.pt")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD)
    ]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize("backend_name,local_loss", CASES)
def test_two_gloo_ranks_match_one_process(rank_results, backend_name, local_loss):
    image, text, scale = global_batch(WORLD)
    full = _one_process(image, text, scale)
    per_rank = [results[(backend_name, local_loss)] for results in rank_results]
    for rank, got in enumerate(per_rank):
        expected = _rank_values(image, text, scale, rank) if local_loss else full
        for key in ("loss", "i2t_acc", "t2i_acc"):
            assert_close(got[key], expected[key], dtype=torch.float32, name=f"rank {rank} {key}")
    mean_loss = torch.stack([got["loss"] for got in per_rank]).mean()
    assert_close(mean_loss, full["loss"], dtype=torch.float32, name="rank-mean loss")
    for key in ("d_image", "d_text"):
        averaged = torch.cat([got[key] for got in per_rank]) / WORLD
        assert_close(averaged, full[key], dtype=torch.float32, grad=True, name=f"averaged {key}")
    averaged_scale = torch.stack([got["d_logit_scale"] for got in per_rank]).mean()
    assert_close(averaged_scale, full["d_logit_scale"], dtype=torch.float32, grad=True, name="averaged d_logit_scale")


@pytest.mark.distributed
@pytest.mark.parametrize("backend_name", IDS_CASES)
def test_two_gloo_ranks_multi_positive_match_one_process(rank_results, backend_name):
    """Group ids spanning both ranks: every rank's loss is the one-process multi-positive loss of
    the concatenated batch, and the rank-averaged gradients equal its gradients."""
    image, text, scale = global_batch(WORLD)
    image_ids, text_ids = global_ids(WORLD)
    leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    full = contrastive_loss_multi_positive_reference(*leaves, image_ids, text_ids, label_smoothing=LABEL_SMOOTHING)
    full.backward()
    per_rank = [results[(backend_name, "ids")] for results in rank_results]
    for rank, got in enumerate(per_rank):
        assert_close(got["loss"], full, dtype=torch.float32, name=f"rank {rank} loss")
    for key, leaf in (("d_image", leaves[0]), ("d_text", leaves[1])):
        averaged = torch.cat([got[key] for got in per_rank]) / WORLD
        assert_close(averaged, leaf.grad, dtype=torch.float32, grad=True, name=f"averaged {key}")
    averaged_scale = torch.stack([got["d_logit_scale"] for got in per_rank]).mean()
    assert_close(averaged_scale, leaves[2].grad, dtype=torch.float32, grad=True, name="averaged d_logit_scale")
