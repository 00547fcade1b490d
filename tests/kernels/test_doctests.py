"""The examples in the kernels' docstrings run as tests (pyproject's testpaths do not list kernels/)."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["rlkit.kernels.advantages", "rlkit.kernels.logprobs"])
def test_docstring_examples(name):
    failures, tried = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
