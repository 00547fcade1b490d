"""The examples in the rollout modules' docstrings run as tests (pyproject's testpaths do not list rollout/)."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["rlkit.rollout.vllm_console", "rlkit.rollout.vllm_engine",
                                  "rlkit.rollout.generations"])
def test_docstring_examples(name):
    failures, tried = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
