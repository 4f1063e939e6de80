"""`llada_trm.training` re-exports the public names of its submodules, the feature cache's included."""

from __future__ import annotations

import pytest

import llada_trm.training as training
from llada_trm.training import feature_cache, init_from


@pytest.mark.parametrize("module", [feature_cache, init_from], ids=lambda m: m.__name__)
def test_submodule_public_names_are_exported(module):
    for name in module.__all__:
        if name.isupper() and module is init_from:
            continue  # init_from's constants are its own business
        assert name in training.__all__, name
        assert getattr(training, name) is getattr(module, name)


def test_every_exported_name_exists():
    assert sorted(set(training.__all__)) == sorted(training.__all__)
    for name in training.__all__:
        assert hasattr(training, name), name
