"""The training layer: what runs on a trainer rank. The batch types at the bottom (rlkit.training.batches, which
imports nothing of rlkit), losses, the FSDP2 policy trainer, the critic, the frozen reference model, packing and
micro-batching, attention for packed rows, LoRA, building or loading models, and `auto` precision (rlkit.training.precision).

Imports: rlkit.recipe and the leaf rlkit.kernels; never data, runtime, algorithms or orchestration, and never Ray.
"""
