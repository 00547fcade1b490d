"""The trainer: one rank of a group that holds a causal LM sharded with FSDP2, its optimizer and schedule.

Each rank gets a slice of the step batch's rows and a loss object (rlkit.training.losses) for `step(loss, batch)`; it splits
the rows into micro-batches (by rows and, with
trainer.micro_batch_tokens, by tokens; rows packed into one sequence: rlkit.training.packing) and accumulates gradients;
FSDP2 reduces them across ranks (rlkit.training.rank). Losses are sums divided by a normaliser the controller computes
over the whole step batch, so the update is the same for any number of ranks and any micro-batch size
(see rlkit.training.losses). Per-token log-probs go through the fused kernel, never through full logits.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

import torch

from rlkit.kernels import fused_logprobs
from rlkit.recipe import RefConfig, TrainerConfig
from rlkit.training.attention import model_attn_implementation
from rlkit.training.lora import apply_lora, peft_adapter_tensors
from rlkit.training.batches import TokenBatch, rank_part
from rlkit.training.losses import Forward
from rlkit.training.packing import layout_rows
from rlkit.training.precision import torch_dtype
from rlkit.training.rank import (RankWorker, autocast_dtype, compile_blocks, default_device,
                                 enable_gradient_checkpointing, prepare_torch, pretrained_kwargs, resolve_dtype,
                                 shard_with_fsdp2, to_device)
from rlkit.training.weights import TrainerWeights

__all__ = ["RankWorker", "prepare_torch"]  # re-exported: the rank machinery lives in rlkit.training.rank

log = logging.getLogger(__name__)


class LogprobModel(torch.nn.Module):
    """A causal LM seen as tokens -> per-token log-probs of the targets, through the fused kernel.

    It is the FSDP2 root unit: its forward unshards the embedding, final norm and LM head, so the kernel may
    read the LM head weight directly (and the backward reduces its gradient) without full logits. The kernel reads
    the response targets alone, from rows packed into one sequence (`packing`) or right-padded.
    """

    def __init__(self, lm: torch.nn.Module, packing: bool = False, autocast: torch.dtype | None = None):
        super().__init__()
        self.lm, self.packing, self.autocast = lm, packing, autocast

    def forward(self, batch: TokenBatch, temperature: float = 1.0, impl: str = "auto", return_entropy: bool = False):
        layout = layout_rows(batch.input_ids, batch.attention_mask, batch.response_mask, self.packing)
        body = getattr(self.lm, self.lm.base_model_prefix)  # the transformer without its LM head
        hidden = layout.hidden(body, self.autocast)  # (N, H) at the N response targets
        weight = self.lm.get_output_embeddings().weight  # (V, H)
        with torch.autocast(hidden.device.type, enabled=False) if self.autocast else contextlib.nullcontext():
            logprobs, entropy = fused_logprobs(hidden, weight, layout.targets, temperature=temperature,
                                               return_entropy=return_entropy, impl=impl)  # (N,), (N,) | None
        return layout.scatter(logprobs), None if entropy is None else layout.scatter(entropy)  # (B, L-1)


def sequence_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float = 1.0,
    impl: str = "auto",
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, L-1) of the targets under `model`, zero off the response; never full logits."""
    if not isinstance(model, LogprobModel):
        model = LogprobModel(model)
    return model(batch, temperature, impl, return_entropy)


@torch.no_grad()
def batched_logprobs(
    model: torch.nn.Module, batch: TokenBatch, micro_batches: int | list[torch.Tensor], temperature: float = 1.0,
    impl: str = "auto",
) -> torch.Tensor:
    """(B, L-1) log-probs without gradients, micro-batch by micro-batch: runs of `micro_batches` rows, or the row
    indices of each (RankWorker.micro_batches)."""
    if isinstance(micro_batches, int):
        micro_batches = torch.arange(len(batch)).split(micro_batches)
    out = None
    for rows in micro_batches:
        part = sequence_logprobs(model, batch.select(rows), temperature, impl)[0]  # (b, L-1)
        out = part.new_zeros(batch.response_mask.shape) if out is None else out
        out[rows] = part
    return batch.response_mask.new_zeros(batch.response_mask.shape) if out is None else out


def load_causal_lm(model_path: str, cfg: TrainerConfig) -> torch.nn.Module:
    """The policy's LM with its weights in trainer.param_dtype (float32 under bf16 mixed precision)."""
    from transformers import AutoModelForCausalLM

    prepare_torch(cfg)
    return AutoModelForCausalLM.from_pretrained(model_path, **pretrained_kwargs(resolve_dtype(cfg)))


def reference_dtype(cfg: RefConfig) -> torch.dtype:
    """ref.dtype on this worker's device, "auto" being bfloat16 where it is native, else float32 (rlkit.training.precision)."""
    return torch_dtype(cfg.dtype, default_device())


def load_reference_model(cfg: RefConfig, model_path: str, packing: bool = False, attn_implementation: str = "auto",
                         compile: bool = False) -> LogprobModel:
    """The frozen reference as a LogprobModel on the CPU, in ref.dtype, no gradients: what both placements load
    (ref.placement: rlkit.training.reference.ReferenceModel's own actor, or ShardedTrainer.load_reference)."""
    from transformers import AutoModelForCausalLM

    dtype = reference_dtype(cfg)
    attn = model_attn_implementation(attn_implementation, packing, dtype)
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn)
    compile_blocks(list(getattr(lm, lm.base_model_prefix).layers), compile)
    model = LogprobModel(lm, packing).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ShardedTrainer(RankWorker):
    """One rank of the policy. With world_size > 1 the model is sharded with FSDP2 (gloo on CPU, nccl on
    GPU); the caller (rlkit.runtime.cluster) starts one per rank and sets MASTER_ADDR/MASTER_PORT."""

    def __init__(self, cfg: TrainerConfig, model_path: str, lr: float, warmup_steps: int, total_steps: int = 0,
                 rank: int = 0, world_size: int = 1):
        cfg = resolve_dtype(cfg)
        lm = load_causal_lm(model_path, cfg)
        if cfg.lora_rank:
            lm = apply_lora(lm, cfg)
        enable_gradient_checkpointing(lm, cfg)
        blocks = list(getattr(lm, lm.base_model_prefix).layers)
        compile_blocks(blocks, cfg.compile)
        model = LogprobModel(lm, cfg.packing, autocast_dtype(cfg, world_size))
        super().__init__(cfg, model, blocks, lr, warmup_steps, rank, world_size, total_steps)
        self.reference: LogprobModel | None = None  # ref.placement=trainer: the stage's frozen reference

    # -- the reference on the policy's ranks (ref.placement=trainer) ------------------------------------------
    def load_reference(self, ref: RefConfig, model_path: str) -> None:
        """The stage's frozen reference (its starting model) on this rank, in ref.dtype, sharded with FSDP2 over the
        policy's ranks as the policy is (one unit per block, over the same process group; no optimizer, no mixed
        precision): it fits wherever the policy fits. Every rank must call it, at once."""
        model = load_reference_model(ref, model_path, self.cfg.packing, self.cfg.attn_implementation,
                                     self.cfg.compile).to(self.device)
        if self.world_size > 1:
            # its weights are already in ref.dtype: gathered and computed as they are (bf16: param_dtype bf16)
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            shard_with_fsdp2(model, list(getattr(model.lm, model.lm.base_model_prefix).layers), self.rank,
                             self.world_size, replace(self.cfg, dtype=dtype))
        self.reference = model

    def ref_logprobs(self, batch: TokenBatch, temperature: float = 1.0, rows: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """(b, L-1) the reference's log-probs of this rank's `rows` of the batch (None: all), in the trainer's
        micro-batches (as ReferenceModel)."""
        if self.reference is None:
            raise RuntimeError("ref_logprobs before load_reference: no reference on this rank")
        batch = rank_part(batch, rows)
        out = batched_logprobs(self.reference, to_device(batch, self.device), self.micro_batches(batch), temperature,
                               self.cfg.logprob_impl).cpu()
        if self.world_size > 1:  # FSDP2 keeps the root unit (embedding, head) gathered after a forward: free it
            self.reference.reshard()
        return out

    def drop_reference(self) -> None:
        """Free the reference's weights (its stage has ended)."""
        self.reference = None

    # -- log-probs -------------------------------------------------------------------------------------
    def logprobs(self, batch: TokenBatch, temperature: float = 1.0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(b, L-1) log-probs of this rank's `rows` of the batch (None: all) without gradients."""
        batch = rank_part(batch, rows)
        self.model.eval()
        plan = self.micro_batches(batch)
        return batched_logprobs(self.model, to_device(batch, self.device), plan, temperature,
                                self.cfg.logprob_impl).cpu()

    def forward(self, loss, batch) -> Forward:
        """A micro-batch's log-probs (and entropy, when `loss` needs it) at the loss's temperature, for `step`."""
        return Forward(*sequence_logprobs(self.model, batch.tokens, loss.temperature, self.cfg.logprob_impl,
                                          return_entropy=loss.needs_entropy))

    # -- weights ---------------------------------------------------------------------------------------
    def full_state_dict(self, merged: bool = True) -> dict[str, torch.Tensor]:
        """The unsharded weights on CPU under the model's own names, LoRA merged, or with `merged=False` the
        frozen base alone (every rank must call it)."""
        return self.gathered_state(merged)

    def weights(self, dtype: torch.dtype, mode: str = "merged") -> TrainerWeights:
        """The weights as the engines take them, streamed one gathered parameter at a time (rlkit.training.weights):
        "merged", the frozen "base" under LoRA, or the "adapter" alone; every rank must iterate it at once."""
        return TrainerWeights(self.model.lm, dtype, self.lora_scale, mode)

    def open_weight_transfer(self, connect, dtype: str) -> None:
        """This rank's side of the weight transfer to the engines: `connect(stream, rank=...)` is
        rlkit.rollout.weight_transfer.open_trainer_engine with the engines bound (rlkit.runtime.cluster passes it in,
        so this layer imports no engine code). Every rank calls it at once; rank 0 meets the engines."""
        self._stream = self.weights(getattr(torch, dtype))
        self._transfer = connect(self._stream, rank=self.rank)

    def send_weights(self, mode: str = "merged") -> float:
        """Stream the weights ("merged", or the frozen "base" under LoRA) to the engines through the transfer
        opened by `open_weight_transfer` (every rank must call it; rank 0 sends). Returns the MB sent."""
        self._stream.mode = mode
        self._transfer.send_weights()
        return sum(m.nbytes for m in self._stream.metadata()) / 2**20

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA adapter's unsharded tensors on CPU in PEFT's file layout (every rank must call it): what
        trainer.lora_sync=adapter sends to the engines instead of the whole model."""
        from torch.distributed.tensor import DTensor

        state = {}
        for name, param in self.model.lm.named_parameters():  # the same order on every rank
            if ".lora_" in name:
                value = param.detach()
                state[name] = (value.full_tensor() if isinstance(value, DTensor) else value).cpu()
        return peft_adapter_tensors(state)

    def save(self, path: str, tokenizer_path: str, recipe_yaml: str, extra: dict | None = None) -> str | None:
        """Hugging Face checkpoint of the full weights (written by rank 0); returns the path on rank 0."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlkit.training.modeling import save_checkpoint

        state = self.full_state_dict()
        if self.rank != 0:
            return None
        model, dtype = self.model.lm, getattr(torch, self.cfg.dtype)
        # plain merged tensors from an unsharded copy, in trainer.dtype (mixed precision holds float32 weights)
        if self.world_size > 1 or self.cfg.lora_rank or self.cfg.param_dtype != self.cfg.dtype:
            model = AutoModelForCausalLM.from_config(self.model.lm.config, dtype=dtype)
            model.load_state_dict(state)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        return str(save_checkpoint(model, tokenizer, Path(path), recipe_yaml, extra))
