"""The error a bad recipe raises (a leaf module: rlkit.recipe and rlkit.recipe.stage_kinds both raise it)."""


class RecipeError(ValueError):
    """Bad input in a recipe, an override or a file it names; the message names the field and the fix."""
