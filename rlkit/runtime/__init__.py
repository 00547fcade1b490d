"""The runtime layer: what a run runs on. The workers in this process or as Ray actors (rlkit.runtime.cluster, the
one module that imports Ray, with rlkit.runtime.placement for clusters of several nodes), building the recipe's
reward scorer (rlkit.runtime.scoring), resume points and checkpoints (rlkit.runtime.checkpoint) and metric logging
(rlkit.runtime.tracking).

Imports: rlkit.recipe, rlkit.training and the leaves; never algorithms or orchestration.
"""
