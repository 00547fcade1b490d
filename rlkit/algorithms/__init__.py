"""Stage algorithms: each module has `train(ctx)` that runs one stage of a recipe."""
