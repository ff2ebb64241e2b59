"""Fixtures of the training tests."""

import pytest
from helpers.training import make_train_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny shapes set (+ tokenizer, + a shard of broken samples) of the in-process trainings."""
    out = tmp_path_factory.mktemp("shapes")
    make_train_data(out)
    return out
