"""Recipes: the whole Alpaca pipeline (generate -> dedup -> curate -> train -> preference -> eval
-> export) as one resumable command, each stage skipped while its config and inputs are unchanged."""

from alpaca_jax.recipe.runner import Recipe, StageState, format_status, load_recipe, recipe_status, run_recipe
from alpaca_jax.recipe.stages import ORDER, STAGES, RecipeError

__all__ = ["Recipe", "StageState", "load_recipe", "run_recipe", "recipe_status", "format_status",
           "ORDER", "STAGES", "RecipeError"]
