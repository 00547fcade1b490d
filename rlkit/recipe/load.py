"""Loading a recipe: defaults <- YAML file <- `key=value` overrides, strictly typed (an unknown key names the closest
valid one), then checked (rlkit.recipe.checks.validate); and writing the resolved recipe back as YAML."""

from __future__ import annotations

import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rlkit.recipe.checks import validate
from rlkit.recipe.config import RecipeConfig
from rlkit.recipe.errors import closest as _closest
from rlkit.recipe.errors import RecipeError


def _section_class(full_key: str) -> type:
    """The dataclass that holds `full_key` (e.g. 'rollout.temprature' -> RolloutConfig)."""
    cls: type = RecipeConfig
    for part in full_key.split(".")[:-1]:
        hint = typing.get_type_hints(cls).get(part.split("[")[0])
        if hint is None:
            continue  # a list index such as stages.0
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else hint  # List[StageConfig] -> StageConfig
        if is_dataclass(inner):
            cls = inner
    return cls


def _friendly(err: OmegaConfBaseException, source: str) -> RecipeError:
    full_key = getattr(err, "full_key", "") or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        key = full_key.split(".")[-1] if full_key else str(getattr(err, "key", ""))
        obj = getattr(err, "object_type", None)
        section = obj if obj is not None and is_dataclass(obj) else _section_class(full_key)
        return RecipeError(f"{source}: unknown key '{full_key or key}' in {section.__name__}.{_closest(key, section)}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return RecipeError(f"{source}: bad value for '{full_key}': {msg}")
    return RecipeError(f"{source}: {str(err).splitlines()[0]}")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> RecipeConfig:
    """Defaults <- YAML file <- `key=value` overrides, strictly typed, then validated."""
    schema = OmegaConf.structured(RecipeConfig)
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe: file '{path}' not found; expected a YAML recipe such as recipes/quickstart.yaml")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # yaml.YAMLError and friends
            raise RecipeError(f"recipe: '{path}' is not valid YAML: {e}") from e
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"override '{item}': expected key=value, e.g. rollout.temperature=0.7")
    try:
        merged = OmegaConf.merge(*layers)
        if overrides:
            # Overrides edit the merged tree as plain data, then it is re-checked against the schema;
            # unlike a merged dotlist this understands list indices (stages.0.steps=5).
            tree = OmegaConf.to_container(merged)
            for item in overrides:
                key, _, raw = item.partition("=")
                _set_path(tree, key.strip(), _parse_value(raw), item)
            merged = OmegaConf.merge(schema, tree)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        where = [f"recipe '{path}'"] if path else []
        where += [f"overrides {' '.join(overrides)}"] if overrides else []
        raise _friendly(e, " + ".join(where) or "defaults") from e
    validate(cfg)
    return cfg


def _parse_value(raw: str) -> Any:
    """An override's value as YAML (numbers, lists, {a: 1}); text that is not valid YAML stays text, so a prompt
    template such as `{prompt}\nAnswer:` needs no quoting (the schema still checks its type).

    >>> _parse_value("0.5"), _parse_value("[1, 2]"), _parse_value("{prompt} Answer after ####.")
    (0.5, [1, 2], '{prompt} Answer after ####.')
    """
    if not raw:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_path(tree: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "recipe"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override '{item}': '{where}' has {len(node)} entries; '{part}' is not an index of it")
            part = int(part)
        elif not isinstance(node, dict):
            raise RecipeError(f"override '{item}': '{where}' is a value, not a section")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part] if isinstance(node, list) or part in node else node.setdefault(part, {})


def to_yaml(cfg: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
