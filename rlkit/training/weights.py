"""The trainer's weights as the engines take them: a stream of (name, tensor) in the engine's dtype and Hugging Face
names, gathered one FSDP2 parameter at a time, cut into buckets of a fixed size.

`TrainerWeights` is what a weight-transfer backend iterates (rlkit.rollout.weight_transfer wraps it as vLLM's
`WeightSource`): `metadata()` declares every tensor without gathering anything (a DTensor's global shape), and each
pass of `iter(...)` gathers one parameter (`DTensor.full_tensor()`, a collective every rank runs in the same order),
casts it to the engine's dtype, and yields it. The transport packs the stream into buffers of a fixed size
(rollout.sync_bucket_mb; rlkit.rollout.weight_transfer.plan_buckets), so a rank holds its shard, the one parameter
being gathered and, on rank 0, the bucket being sent: never the whole model, in float32 or otherwise.

What is yielded, by `mode`:
- "merged": every weight, LoRA merged (W + alpha / r * B @ A) under the base layer's own name;
- "base": every weight of the frozen base under a LoRA trainer (scaling 0: the adapter left out);
- "adapter": the LoRA adapter alone, under PEFT's file names (rlkit.training.lora.peft_adapter_tensors).
A tied embedding is one Parameter, so it is yielded once; rlkit's own wrapper (LogprobModel's `lm.`) never shows,
since the stream walks the Hugging Face model itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from rlkit.training.lora import ADAPTER

MODES = ("merged", "base", "adapter")


@dataclass(frozen=True)
class WeightMeta:
    name: str  # the engine's (Hugging Face) name
    dtype: torch.dtype  # on the wire: the engine's dtype
    shape: tuple[int, ...]  # the full (unsharded) shape

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter: an all-gather every rank must run."""
    value = param.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class TrainerWeights:
    """The weights of `lm` (a Hugging Face causal LM, possibly LoRA-injected and FSDP2-sharded) as the engine takes
    them, in `dtype`. Re-iterable: each `iter` is a fresh pass, which every rank must run at once."""

    def __init__(self, lm: torch.nn.Module, dtype: torch.dtype, lora_scaling: float = 0.0, mode: str = "merged"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.lm, self.dtype, self.lora_scaling, self.mode = lm, dtype, lora_scaling, mode
        self._params = dict(lm.named_parameters())  # a tied embedding once, in module order on every rank

    def _plan(self) -> list[tuple[str, list[str]]]:
        """(engine name, the parameters it is made of) in the order every rank gathers them."""
        plan = []
        for name in self._params:
            if ".lora_" in name:
                if self.mode == "adapter":
                    plan.append(("base_model.model." + name.replace(f".{ADAPTER}.", "."), [name]))
                continue
            if self.mode == "adapter":
                continue
            if ".base_layer." in name:
                prefix, _, leaf = name.partition(".base_layer.")
                lora = [f"{prefix}.lora_A.{ADAPTER}.weight", f"{prefix}.lora_B.{ADAPTER}.weight"]
                merge = leaf == "weight" and self.mode == "merged" and self.lora_scaling
                plan.append((f"{prefix}.{leaf}", [name] + (lora if merge else [])))
            else:
                plan.append((name, [name]))
        return plan

    def metadata(self) -> list[WeightMeta]:
        """Every tensor the next pass yields, in order, without gathering (a DTensor knows its global shape)."""
        return [WeightMeta(out, self.dtype, tuple(self._params[parts[0]].shape)) for out, parts in self._plan()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for out, parts in self._plan():
            value = _full(self._params[parts[0]])
            if len(parts) == 3:  # base + scaling * B @ A, in the master dtype before the cast
                a, b = _full(self._params[parts[1]]), _full(self._params[parts[2]])  # (r, in), (out, r)
                value = value + self.lora_scaling * (b.to(value.dtype) @ a.to(value.dtype))
            yield out, value.to(device="cpu", dtype=self.dtype)
