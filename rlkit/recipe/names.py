"""The names of the recipe's named switches, torch-free, for the checks a recipe passes at load; the loader of a
user's own implementation by import path; and whether a source names a local path or a hub id (looks_local).

Each switch has one registry of implementations where its code lives (rlkit.training.losses: policy losses, KL
estimators, DPO losses, loss aggregations; rlkit.algorithms.episodes: environments); tests hold each registry's
names equal to the tuple here. A recipe names a built-in, or its own function by "pkg.module:name", as rewards do:

    algo: {pg_loss: "my_pkg.losses:my_policy_loss"}

A user's implementation is imported when the run starts (rlkit.orchestration.runner), not when the recipe loads.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from rlkit.recipe.errors import RecipeError

POLICY_LOSSES = ("clip", "cispo")  # algo.pg_loss
KL_ESTIMATORS = ("k1", "k2", "k3")  # ref.kl_estimator
DPO_LOSSES = ("sigmoid", "ipo")  # algo.dpo_loss
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # algo.loss_agg
ENVIRONMENTS = ("tools",)  # env.name ("" is none; your own comes in by env.import_path)

IMPORT_PATH = r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*"


def is_import_path(value: str) -> bool:
    """
    >>> is_import_path("my_pkg.losses:my_loss"), is_import_path("clip"), is_import_path("a:b:c")
    (True, False, False)
    """
    return re.fullmatch(IMPORT_PATH, value) is not None


def check_switch(key: str, value: str, names: tuple[str, ...]) -> None:
    """A switch's value is one of its built-in names or an import path 'pkg.module:name'."""
    if value not in names and not is_import_path(value):
        raise RecipeError(f"{key}: '{value}' is not one of {', '.join(names)} (or 'pkg.module:name' for your own)")


def load_object(import_path: str, key: str) -> Any:
    """The object at 'pkg.module:name'; a bad path is one RecipeError naming `key`."""
    module_name, _, attr = import_path.partition(":")
    if not is_import_path(import_path):
        raise RecipeError(f"{key}: '{import_path}' is not of the form 'pkg.module:name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while importing the user's module
        raise RecipeError(f"{key}: cannot import module '{module_name}' ({type(e).__name__}: {e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{key}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


T = TypeVar("T")


class Registry(Generic[T]):
    """The implementations of one named switch: built-ins registered by name where their code lives, a user's
    loaded by import path. `key` is the recipe field (for errors), `names` the torch-free tuple above."""

    def __init__(self, key: str, names: tuple[str, ...]) -> None:
        self.key, self.names, self._items = key, names, {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            self._items[name] = item
            return item
        return add

    def registered(self) -> tuple[str, ...]:
        return tuple(self._items)

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if is_import_path(name):
            return load_object(name, self.key)
        raise RecipeError(f"{self.key}: '{name}' is not one of {', '.join(self._items)} "
                          "(or 'pkg.module:name' for your own)")


# What a hub id looks like ("org/name"); anything else that does not exist is a missing local path.
HUB_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz")


def looks_local(source: str) -> bool:
    """Whether `source` names a local path (it exists, or has a path's shape) rather than a hub name.

    >>> looks_local("openai/gsm8k"), looks_local("data/sft.jsonl"), looks_local("./gsm8k"), looks_local("/x/y")
    (False, True, True, True)
    """
    return (Path(source).exists() or source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES)
            or not re.fullmatch(HUB_ID, source))
