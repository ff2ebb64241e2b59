"""``no_launches`` (bench/host_overhead.py) stubs every kernel object an op module launches, the
autotuners the contrastive loss keeps per dot precision in dicts included, and puts them back."""

import importlib
from unittest import mock

import torch
from vlmcore.bench.host_overhead import _NoLaunch, no_launches
from vlmcore.kernels import backend, contrastive_loss

contrastive_module = importlib.import_module("vlmcore.kernels.contrastive")


def test_the_per_precision_autotuners_are_stubbed_and_restored():
    originals = dict(contrastive_module._fwd_tuned)
    with no_launches(contrastive_module):
        assert set(contrastive_module._fwd_tuned) == {"tf32", "ieee"}
        assert all(isinstance(stub, _NoLaunch) for stub in contrastive_module._fwd_tuned.values())
        assert isinstance(contrastive_module._contrastive_fwd_kernel, _NoLaunch)  # the top-level kernels too
        grids = []
        contrastive_module._fwd_tuned["tf32"][lambda meta: grids.append(meta["BLOCK_M"]) or (1,)](0, 1)
        assert grids == [originals["tf32"].configs[0].kwargs["BLOCK_M"]]  # the grid runs, nothing launches
    assert all(contrastive_module._fwd_tuned[precision] is tuner for precision, tuner in originals.items())


def test_the_cuda_launch_path_launches_nothing():
    """The launchers' CUDA branch (``tuned[precision][grid]``) on CPU tensors: without the dict stubs
    it would compile for a GPU that is not there."""
    image = torch.randn(64, 32, requires_grad=True)
    text = torch.randn(64, 32, requires_grad=True)
    with backend("triton"), mock.patch.object(contrastive_module, "interpreter_enabled", lambda: False), \
            no_launches(contrastive_module):
        contrastive_loss(image, text, torch.tensor(10.0)).backward()
    assert image.grad.shape == image.shape and text.grad.shape == text.shape
