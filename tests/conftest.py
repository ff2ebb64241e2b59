"""Test harness.

- Without CUDA, the Triton interpreter is switched on BEFORE triton / vlmcore are imported, so
  forcing the ``triton`` backend runs the real kernels on CPU tensors.
- Markers (declared in pytest.ini): ``gpu`` (skipped here without CUDA), ``slow``, ``distributed``.
- ``nan_poisoned_empty``: while a kernel test runs, fresh buffers from ``torch.empty`` /
  ``torch.empty_like`` are NaN-filled, so an output element a kernel forgets to write fails the
  test instead of passing by luck (memory that happened to hold a right-looking value).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        tensor.fill_(float("nan"))
    elif tensor.dtype != torch.bool:
        tensor.fill_(-(2**31) + 1 if tensor.element_size() >= 4 else -1)
    return tensor


@pytest.fixture
def nan_poisoned_empty(monkeypatch):
    """Make ``torch.empty`` and ``torch.empty_like`` return poisoned (NaN / garbage-int) tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
