"""LoRA through peft: adapters injected into the Hugging Face model in place, merged for sync and saving.

The engine and the checkpoints always see plain merged weights (W + alpha / r * B @ A) under the model's own
parameter names, so vLLM reloads them like any other update and the next stage starts from a normal model.
"""

from __future__ import annotations

import torch

from rlkit.config import TrainerConfig

ADAPTER = "default"


def apply_lora(model: torch.nn.Module, cfg: TrainerConfig) -> torch.nn.Module:
    """Inject LoRA layers into `model` in place and freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                        lora_dropout=0.0, bias="none")
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def merge_lora_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Plain weights from a LoRA-injected state dict: base + scaling * B @ A, adapter tensors dropped.

    >>> sd = {"q.base_layer.weight": torch.zeros(2, 2), "q.lora_A.default.weight": torch.ones(1, 2),
    ...       "q.lora_B.default.weight": torch.ones(2, 1), "norm.weight": torch.ones(2)}
    >>> merged = merge_lora_state_dict(sd, 0.5)
    >>> sorted(merged), merged["q.weight"].tolist()
    (['norm.weight', 'q.weight'], [[0.5, 0.5], [0.5, 0.5]])
    """
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, _, leaf = key.partition(".base_layer.")
            if leaf == "weight":
                a = state[f"{prefix}.lora_A.{ADAPTER}.weight"].to(value.dtype)  # (r, in)
                b = state[f"{prefix}.lora_B.{ADAPTER}.weight"].to(value.dtype)  # (out, r)
                value = value + scaling * (b @ a)
            key = f"{prefix}.{leaf}"
        merged[key] = value
    return merged
