"""The trainer's weight stream (rlkit.training.weights): on two FSDP2 ranks it yields exactly what one unsharded rank
yields (LoRA merged, the base alone, or the adapter alone; a tied embedding once), in the engine's dtype, one
parameter gathered at a time."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from rlkit.recipe import TrainerConfig
from rlkit.training.lora import merge_lora_state_dict, peft_adapter_tensors
from rlkit.training.trainer import ShardedTrainer

CFG = TrainerConfig(lora_rank=4, lora_alpha=8.0, dtype="float32", logprob_impl="torch", num_threads=1)
MODES = ("merged", "base", "adapter")


def perturbed(trainer: ShardedTrainer) -> ShardedTrainer:
    """LoRA B starts at zero, which would hide a wrong merge: every adapter tensor gets a seeded value."""
    with torch.no_grad():
        for name, p in trainer.model.lm.named_parameters():
            if ".lora_" in name:
                full = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
                if hasattr(p, "full_tensor"):  # this rank's rows of the same full tensor
                    from torch.distributed.tensor import distribute_tensor

                    full = distribute_tensor(full, p.device_mesh, p.placements)
                p.copy_(full)
    return trainer


def streams(trainer: ShardedTrainer) -> dict:
    """Each mode's metadata and stream, in bfloat16 (the engine's dtype in a bf16 run)."""
    out = {}
    for mode in MODES:
        source = trainer.weights(torch.bfloat16, mode)
        meta = source.metadata()
        pairs = list(source)
        out[mode] = (meta, pairs)
    return out


def _rank(rank: int, path: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    trainer = perturbed(ShardedTrainer(CFG, path, lr=1e-3, warmup_steps=0, rank=rank, world_size=2))
    result = streams(trainer)  # both ranks iterate: each parameter is an all-gather
    if rank == 0:
        torch.save(result, out)
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(chat_model_path, tmp_path_factory):
    from rlkit.runtime.cluster import _free_port

    out = str(tmp_path_factory.mktemp("w") / "stream.pt")
    mp.spawn(_rank, args=(chat_model_path, _free_port(), out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def test_two_fsdp2_ranks_stream_what_one_rank_streams(two_ranks, chat_model_path):
    one = perturbed(ShardedTrainer(CFG, chat_model_path, lr=1e-3, warmup_steps=0))
    expected = streams(one)
    state = {k: v.detach() for k, v in one.model.lm.state_dict().items()}
    # merged: W + alpha / r * B @ A under the base names; base: W alone; adapter: PEFT's file names
    reference = {"merged": merge_lora_state_dict(state, CFG.lora_alpha / CFG.lora_rank),
                 "base": merge_lora_state_dict(state, 0.0), "adapter": peft_adapter_tensors(state)}
    for mode in MODES:
        meta, pairs = two_ranks[mode]
        assert [m.name for m in meta] == [name for name, _ in pairs] == [m.name for m in expected[mode][0]]
        for m, (name, t) in zip(meta, pairs):
            assert t.dtype == m.dtype == torch.bfloat16 and tuple(t.shape) == m.shape, name
        for (name, got), (_, want) in zip(pairs, expected[mode][1]):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{mode} {name}")
        names = {name for name, _ in pairs}
        # the tied embedding goes once, under its own name; the state dict names it twice
        assert "lm_head.weight" in reference[mode] or mode == "adapter"
        assert names == set(reference[mode]) - {"lm_head.weight"}, mode
        for name, got in pairs:
            torch.testing.assert_close(got, reference[mode][name].to(torch.bfloat16), rtol=0, atol=0.02, msg=name)
