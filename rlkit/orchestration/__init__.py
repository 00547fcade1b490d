"""The orchestration layer: the runner (rlkit.orchestration.runner), which prepares a run and trains its stages one
after another, each from the previous stage's weights.

Imports: every layer below (recipe, data, training, runtime, algorithms, leaves); never the command-line tools.
"""
