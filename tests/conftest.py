"""Test harness.

- Without CUDA, the Triton interpreter is switched on BEFORE triton / vlmcore are imported, so
  forcing the ``triton`` backend runs the real kernels on CPU tensors.
- Markers (declared in pytest.ini): ``gpu`` (skipped without CUDA), ``interpreter`` (checks that only
  make sense in the Triton interpreter; skipped when CUDA is present, because the interpreter is
  then off), ``slow``, ``distributed``.
- ``device`` fixture: where kernel tests put their tensors. ``cuda`` when a GPU is present (the
  tests then run the compiled kernels), else ``cpu`` (the same tests run the kernels in the
  interpreter). Forcing ``backend("triton")`` on CPU tensors with CUDA present is an error.
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
        skip = ("interpreter", pytest.mark.skip(reason="Triton interpreter check; CUDA is present so it is off"))
    else:
        skip = ("gpu", pytest.mark.skip(reason="needs a CUDA device"))
    for item in items:
        if skip[0] in item.keywords:
            item.add_marker(skip[1])


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests run on: CUDA when present (compiled kernels), else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


# open-clip-torch and timm are installed with --no-deps in the CPU test environment (their
# torchvision requirement would replace the CPU torch); they import torchvision at module level.
# Give them a stand-in that raises on any use, only here in the tests (tests/helpers/torchvision_standin.py).
from helpers import torchvision_standin  # noqa: E402

torchvision_standin.install()
