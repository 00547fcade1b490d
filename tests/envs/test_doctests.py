"""The examples in the environments' docstrings run as tests (pyproject's testpaths do not list envs/)."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["envs.base", "envs.calculator", "envs.tools"])
def test_docstring_examples(name):
    failures, tried = doctest.testmod(importlib.import_module(name))
    assert tried > 0 and failures == 0
