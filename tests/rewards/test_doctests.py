"""The examples in the rewards' docstrings run as tests."""

import doctest
import importlib

import pytest

MODULES = ["rlkit.rewards._codec", "rlkit.rewards.math", "rlkit.rewards.numeric", "rlkit.rewards.honesty", "rlkit.rewards.code",
           "rlkit.rewards.logic", "rlkit.rewards.format", "rlkit.rewards.judge", "rlkit.rewards.model"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    failures, tried = doctest.testmod(importlib.import_module(name))
    assert tried > 0 and failures == 0
