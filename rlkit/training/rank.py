"""What every trained model's rank shares (policy and critic): sharding and precision, the optimizer and schedule,
the micro-batch loop, and resume points.

Precision (trainer.dtype): float32 and float64 hold and compute in that dtype. bfloat16 is mixed precision: the
weights, their gradients and the optimizer state stay float32 (trainer.param_dtype) and the forward/backward runs in
bf16 — through FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) when sharded, through autocast on
one rank. The log-prob kernel runs outside autocast and accumulates in float32 either way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Generic, Optional, TypeVar

import torch

from rlkit.training.batches import rank_part
from rlkit.training.attention import model_attn_implementation
from rlkit.recipe import TrainerConfig
from rlkit.training.lora import merge_lora_state_dict
from rlkit.training.losses import Stats
from rlkit.training.packing import split_micro_batches
from rlkit.training.precision import torch_dtype

log = logging.getLogger(__name__)


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (from 0) over the base rate: linear warmup over `warmup_steps`,
    then constant, or decaying to 0 at `total_steps`, linearly or along a half cosine (as transformers'
    get_linear/cosine_schedule_with_warmup after warmup). Unknown `total_steps` (0): constant after warmup.

    >>> [lr_factor(s, "linear", 2, 6) for s in range(6)]  # warmup 1/2, 2/2; then (6 - s) / (6 - 2)
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    >>> [round(lr_factor(s, "cosine", 0, 4), 3) for s in range(4)]  # (1 + cos(pi * s / 4)) / 2
    [1.0, 0.854, 0.5, 0.146]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))  # 0 after warmup, 1 at the end
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def default_device() -> torch.device:
    """Where a rank's model lives: its GPU when it has one (a Ray actor sees only the GPUs it was given), else the
    CPU. The controller's batches and the results it gets back stay on the CPU (`to_device`, `.cpu()`)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(batch, device: torch.device):
    """A batch dataclass with its tensors, and its nested batches' tensors, on `device` (itself when there already).

    >>> from rlkit.training.batches import SFTBatch, pack_sequences
    >>> moved = to_device(SFTBatch(pack_sequences([[1]], [[2]], 0), 1.0), torch.device("meta"))
    >>> moved.tokens.input_ids.device.type, moved.normalizer
    ('meta', 1.0)
    """
    changes = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor) and value.device != device:
            changes[f.name] = value.to(device, non_blocking=True)
        elif is_dataclass(value):
            changes[f.name] = to_device(value, device)
    return replace(batch, **changes) if changes else batch


def prepare_torch(cfg: TrainerConfig) -> None:
    """Per-process torch settings of a trainer rank: threads and seed."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)


def resolve_dtype(cfg: TrainerConfig) -> TrainerConfig:
    """`cfg` with trainer.dtype `auto` resolved on this rank's device (a run resolves it at start, in the driver; a
    worker built on its own resolves it here, the same way: rlkit.training.precision)."""
    if cfg.dtype != "auto":
        return cfg
    return replace(cfg, dtype=str(torch_dtype(cfg.dtype, default_device())).removeprefix("torch."))


def pretrained_kwargs(cfg: TrainerConfig) -> dict:
    """from_pretrained's dtype and attention for a trained model (policy, critic): weights in trainer.param_dtype
    (float32 under bf16 mixed precision), attention chosen for the trainer.dtype it computes in."""
    cfg = resolve_dtype(cfg)
    attn = model_attn_implementation(cfg.attn_implementation, cfg.packing, getattr(torch, cfg.dtype))
    return {"dtype": getattr(torch, cfg.param_dtype), "attn_implementation": attn}


def autocast_dtype(cfg: TrainerConfig, world_size: int) -> torch.dtype | None:
    """The dtype a 1-rank model's forward autocasts to: bf16 under mixed precision (FSDP2 casts when sharded)."""
    cfg = resolve_dtype(cfg)
    return torch.bfloat16 if cfg.dtype != cfg.param_dtype and world_size == 1 else None


def enable_gradient_checkpointing(model, cfg: TrainerConfig) -> None:
    """Recompute each transformer block in the backward. Non-reentrant: it needs no input that requires grad (LoRA's
    frozen embeddings) and runs inside FSDP2's per-block units, which gather the block again for the recompute."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_blocks(blocks: list[torch.nn.Module], enabled: bool) -> None:
    """trainer.compile: each transformer block's forward through torch.compile (Inductor; AOTAutograd compiles its
    backward), the rest of the model eager. Blocks, not the whole model (PyTorch's "regional compilation"): the
    blocks share one code object, so one graph serves them all and compiles once, and what stays eager around
    them — transformers' mask building, which reads packed rows' position_ids, the embedding and the log-prob
    kernel — causes no graph break. The module's own call (FSDP2's hooks, gradient checkpointing's recompute)
    wraps the compiled forward unchanged. dynamic=True makes the micro-batch's rows and length symbols from the
    first compile, so a new packed or padded length reuses the graph."""
    if enabled:
        for block in blocks:
            block.forward = torch.compile(block.forward, dynamic=True)


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far (Dynamo's own clock; 0 if it has none)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except (ImportError, AttributeError):  # a private helper: a torch without it logs no compile time
        return 0.0


def shard_with_fsdp2(root: torch.nn.Module, blocks: list[torch.nn.Module], rank: int, world_size: int,
                     cfg: TrainerConfig) -> None:
    """FSDP2 over `world_size` ranks: one unit per transformer block, the rest in the root unit."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size)
    policy, cfg = MixedPrecisionPolicy(), resolve_dtype(cfg)
    if cfg.dtype != cfg.param_dtype:  # bf16 gathers and compute, float32 gradient reduction into float32 shards
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.dtype), reduce_dtype=torch.float32)
    for block in blocks:  # gathered just in time for its forward/backward, freed after
        fully_shard(block, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    # Losses are already divided by the whole step batch's normaliser, so ranks' gradients must be summed;
    # FSDP2 would average them by default (a 1/world_size error).
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


S = TypeVar("S", bound=Stats)


@dataclass(frozen=True)
class Update(Generic[S]):
    """What one optimizer update reports: its loss's stats over the whole step batch, and the optimizer's side."""

    stats: S
    grad_norm: float
    lr: float
    compile_seconds: Optional[float] = None  # trainer.compile: torch.compile time since the previous update

    def metrics(self) -> dict[str, float]:
        extra = {} if self.compile_seconds is None else {"perf/compile_seconds": self.compile_seconds}
        return self.stats.metrics() | {"grad_norm": self.grad_norm, "lr": self.lr} | extra

    @staticmethod
    def merge(per_rank: list["Update[S]"]) -> "Update[S]":
        """The ranks' updates as one: stats summed (each rank's are its rows' share), grad norm and learning rate
        the same on every rank, compile time their mean."""
        stats = per_rank[0].stats
        for update in per_rank[1:]:
            stats = stats + update.stats
        seconds = [u.compile_seconds for u in per_rank if u.compile_seconds is not None]
        return Update(stats, per_rank[0].grad_norm, per_rank[0].lr,
                      sum(seconds) / len(seconds) if seconds else None)


class RankWorker:
    """What every trained model's rank shares: sharding, the optimizer and schedule, and the update loop.
    A subclass says what its model computes for a loss on a micro-batch (`forward`)."""

    def __init__(self, cfg: TrainerConfig, model: torch.nn.Module, blocks: list, lr: float, warmup_steps: int,
                 rank: int, world_size: int, total_steps: int = 0):
        self.cfg, self.model, self.rank, self.world_size = cfg, model, rank, world_size
        self.device = default_device()
        model.to(self.device)  # before sharding: FSDP2 shards what is on the device
        if world_size > 1:
            shard_with_fsdp2(model, blocks, rank, world_size, cfg)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg.lr_schedule, warmup_steps, total_steps))
        self.step_count = 0
        self._compile_clock = compile_seconds()  # the step's perf/compile_seconds count from here

    @property
    def lora_scale(self) -> float:
        """LoRA's alpha / rank, what a merge multiplies the adapters' product by (0.0 without adapters)."""
        return self.cfg.lora_alpha / self.cfg.lora_rank if self.cfg.lora_rank else 0.0

    def gathered_state(self, merged: bool = True) -> dict[str, torch.Tensor]:
        """The unsharded weights on CPU under the wrapped model's own names (its `lm`), LoRA merged (`merged=False`:
        the frozen base alone) when the trainer has adapters; every rank must call it."""
        if self.world_size == 1:
            state = {k: v.detach().cpu() for k, v in self.model.lm.state_dict().items()}
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            state = {k.removeprefix("lm."): v for k, v in full.items()}
        return merge_lora_state_dict(state, self.lora_scale if merged else 0.0) if self.cfg.lora_rank else state

    def micro_batches(self, tokens, unit: int = 1) -> list[torch.Tensor]:
        """Row indices (b_i,) of each micro-batch of this rank's rows, a TokenBatch (trainer.micro_batch_size/_tokens;
        `unit` consecutive rows stay together: DPO's pairs).

        With a token budget the count depends on the rows, so the ranks agree on the largest (one all-reduce):
        FSDP2 gathers weights in every forward, and a rank that ran fewer would leave the others waiting."""
        lengths = tokens.attention_mask.sum(-1).tolist()
        args = (lengths, self.cfg.micro_batch_size, self.cfg.micro_batch_tokens, unit)
        plan = split_micro_batches(*args)
        if self.world_size > 1 and self.cfg.micro_batch_tokens:
            import torch.distributed as dist

            count = torch.tensor(len(plan))
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            plan = split_micro_batches(*args, min_count=int(count))
        return [torch.tensor(rows) for rows in plan]

    def forward(self, loss, batch):
        """What `loss` reads of the model on one micro-batch (each subclass: log-probs, values)."""
        raise NotImplementedError

    def step(self, loss, batch, rows: torch.Tensor | None = None, normalizer: float | None = None) -> Update:
        """One optimizer update of `loss` (rlkit.training.losses: a loss object) over this rank's `rows` of the step
        batch (None: all; `normalizer`: a minibatch's loss divisor, rlkit.training.batches.rank_part), micro-batch by
        micro-batch. Its stats are this rank's share of the step's (TrainerGroup sums the ranks')."""
        batch = rank_part(batch, rows, normalizer)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats = None
        for rows in self.micro_batches(batch.tokens, getattr(batch, "rows_per_unit", 1)):
            mb = to_device(batch.select(rows), self.device)
            value, part = loss(self.forward(loss, mb), mb)
            value.backward()
            stats = part if stats is None else stats + part
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {self.step_count}; lower the learning rate")
        lr = self.optimizer.param_groups[0]["lr"]  # this update's (the scheduler then sets the next one's)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return Update(stats, grad_norm, lr, self._compile_seconds())

    def _compile_seconds(self) -> float | None:
        """trainer.compile: torch.compile time in this process since the previous update (log-prob passes' compiles
        included), 0 once nothing recompiles; None without trainer.compile."""
        if not self.cfg.compile:
            return None
        now = compile_seconds()
        spent, self._compile_clock = now - self._compile_clock, now
        if spent > 0:
            log.info("torch.compile: %.1f s before update %d ended", spent, self.step_count)
        return spent

    # -- resume points -----------------------------------------------------------------------------------
    def save_state(self, path: str) -> list[str]:
        """Weights, optimizer, schedule and RNG of this rank under `path` (every rank must call it, at once).

        Sharded with torch.distributed.checkpoint: each rank writes the shards it holds (FSDP2's DTensors; the float32
        weights under mixed precision), nothing gathered, and rank 0 DCP's metadata, all under `dcp/`. Beside them
        `rank<r>.pt`: this rank's schedule, step count, RNG and the world size. Returns the files this rank wrote
        (relative to `path`), which the driver checks it sees before it commits the resume point.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        with _one_process_dcp():
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder / "dcp",
                     no_dist=self.world_size == 1)
        torch.save({"scheduler": self.scheduler.state_dict(), "step_count": self.step_count,
                    "rng": torch.get_rng_state(), "world_size": self.world_size}, folder / f"rank{self.rank}.pt")
        return [f"rank{self.rank}.pt"] + (["dcp/.metadata"] if self.rank == 0 else [])

    def load_state(self, path: str) -> None:
        """Continue from `save_state`'s files, on the same number of ranks (every rank must call it, at once)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        folder = Path(path)
        saved = torch.load(folder / f"rank{self.rank}.pt", weights_only=False)
        if saved["world_size"] != self.world_size:
            raise RuntimeError(f"{folder} was written by {saved['world_size']} trainer ranks, not "
                               f"{self.world_size}; resume with the cluster.trainer_ranks it was written with")
        model_state, optim_state = get_state_dict(self.model, self.optimizer)  # this rank's shards, to fill in
        state = {"model": model_state, "optimizer": optim_state}
        with _one_process_dcp():
            dcp.load(state, checkpoint_id=folder / "dcp", no_dist=self.world_size == 1)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step_count = saved["step_count"]
        torch.set_rng_state(saved["rng"])


@contextlib.contextmanager
def _one_process_dcp():
    """DCP warns on every save and load without a process group, which one rank never has, by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
