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

Shapes sets (built once per session and only when a test asks; shared by every test folder):

- ``shapes_dataset(**params)``: the set of these ``make_shapes`` parameters (+ word tokenizer, + a shard
  of broken samples), built on first use and shared by every test asking for the same parameters.
- ``data``: THE shared set (``TRAIN_SHAPES``). A test module with its own sizes overrides ``data`` with a
  ``shapes_dataset(...)`` call and says in a comment which of its checks needs those sizes.
- ``regions``: the precomputed-region set of the ViLBERT / VL-BERT trainings.

Shared sets are read-only: a test that derives files from one writes them into a ``dataset_view``
(helpers/training.py). At the end of the session every shared set must be as it was built.
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


from helpers.training import TRAIN_SHAPES, file_states, make_train_data  # noqa: E402
from vlmcore.train.tools.region_shapes import make_region_shapes  # noqa: E402


class SharedDirs:
    """Directories built once per session, each recorded as built so that a write into one is caught."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.built = {}  # key -> (directory, file_states when built)

    def get(self, key, build):
        """The directory of ``key``; ``build(directory)`` fills a fresh one the first time."""
        if key not in self.built:
            out = self.tmp_path_factory.mktemp(key[0])
            build(out)
            self.built[key] = (out, file_states(out))
        return self.built[key][0]

    def changed(self) -> list[str]:
        return [str(out) for out, states in self.built.values() if file_states(out) != states]


@pytest.fixture(scope="session")
def shared_dirs(tmp_path_factory):
    dirs = SharedDirs(tmp_path_factory)
    yield dirs
    changed = dirs.changed()
    assert not changed, f"tests wrote into shared data sets (derive files in a dataset_view instead): {changed}"


@pytest.fixture(scope="session")
def shapes_dataset(shared_dirs):
    """``shapes_dataset(**params)`` -> the directory of the shapes set with these ``make_shapes`` parameters."""
    def dataset(**params):
        return shared_dirs.get(("shapes", *sorted(params.items())), lambda out: make_train_data(out, params))
    return dataset


@pytest.fixture(scope="session")
def data(shapes_dataset):
    """The tiny shapes set shared by the in-process trainings and every test that needs no other sizes."""
    return shapes_dataset(**TRAIN_SHAPES)


@pytest.fixture(scope="session")
def regions(shared_dirs):
    """The region-feature shapes set (regions-{train,eval}-*.tar + tokenizer) of the ViLBERT / VL-BERT trainings."""
    params = {"n_train": 96, "n_eval": 24, "image_size": 32, "feature_dim": 32, "shard_size": 96, "seed": 0}
    return shared_dirs.get(("regions", *sorted(params.items())),
                           lambda out: make_region_shapes(str(out), **params))
