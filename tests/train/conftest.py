"""Fixtures of the training tests: the shapes sets, built once per session and only when a test asks.

- ``shapes_dataset(**params)``: the set of these ``make_shapes`` parameters (+ word tokenizer, + a shard
  of broken samples), built on first use and shared by every test asking for the same parameters.
- ``data``: THE shared set (``TRAIN_SHAPES``). A test module with its own sizes overrides ``data`` with a
  ``shapes_dataset(...)`` call and says in a comment which of its checks needs those sizes.
- ``regions``: the precomputed-region set of the ViLBERT / VL-BERT trainings.

Shared sets are read-only: a test that derives files from one writes them into a ``dataset_view``
(helpers/training.py). At the end of the session every shared set must be as it was built.
"""

import pytest
from helpers.training import TRAIN_SHAPES, file_states, make_train_data
from vlmcore.train.tools.region_shapes import make_region_shapes


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
