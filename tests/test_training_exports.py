"""`llada_trm.training` re-exports the public names of its submodules, the feature cache's included."""

from __future__ import annotations

import llada_trm.training as training
from llada_trm.training import feature_cache


def test_submodule_public_names_are_exported():
    for name in feature_cache.__all__:
        assert name in training.__all__, name
        assert getattr(training, name) is getattr(feature_cache, name)


def test_every_exported_name_exists():
    assert sorted(set(training.__all__)) == sorted(training.__all__)
    for name in training.__all__:
        assert hasattr(training, name), name
