"""The error a bad recipe raises (a leaf module: rlkit.recipe and rlkit.recipe.stage_kinds both raise it), and the
"did you mean" its messages end with."""

import difflib
from dataclasses import fields, is_dataclass


class RecipeError(ValueError):
    """Bad input in a recipe, an override or a file it names; the message names the field and the fix."""


def closest(key: str, cls: type) -> str:
    """The end of an unknown-key message: the closest valid key of `cls` (a config dataclass), or all of them."""
    names = [f.name for f in fields(cls)] if is_dataclass(cls) else []
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(names)}."
