"""The examples in the environments' docstrings run as tests (pyproject's testpaths do not list envs/)."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["rlkit.envs.base", "rlkit.envs.calculator", "rlkit.envs.tools"])
def test_docstring_examples(name):
    failures, tried = doctest.testmod(importlib.import_module(name))
    assert tried > 0 and failures == 0
