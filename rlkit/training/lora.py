"""LoRA through peft: adapters injected into the Hugging Face model in place, merged for saving.

Checkpoints always hold plain merged weights (W + alpha / r * B @ A) under the model's own parameter names, so the
next stage starts from a normal model. The engines take either those merged weights (trainer.lora_sync=merged) or
the frozen base once and then the adapter alone, in PEFT's file layout, which vLLM serves as a LoRA request
(trainer.lora_sync=adapter).
"""

from __future__ import annotations

import torch

from rlkit.recipe import TrainerConfig

ADAPTER = "default"


def apply_lora(model: torch.nn.Module, cfg: TrainerConfig) -> torch.nn.Module:
    """Inject LoRA layers into `model` in place and freeze everything else."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(lora_config(cfg), model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def lora_config(cfg: TrainerConfig):
    """peft's LoraConfig for the trainer's adapters (no dropout, no bias: merged and served weights are exact)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def adapter_config(cfg: TrainerConfig) -> dict:
    """The adapter_config.json that PEFT and vLLM read for this trainer's adapters."""
    config = lora_config(cfg).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # sets are not JSON


def peft_adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA-injected state dict under PEFT's file names (what vLLM loads).

    >>> sd = {"model.q.lora_A.default.weight": torch.ones(1, 2), "model.q.base_layer.weight": torch.ones(2, 2)}
    >>> list(peft_adapter_tensors(sd))
    ['base_model.model.model.q.lora_A.weight']
    """
    return {"base_model.model." + k.replace(f".{ADAPTER}.", "."): v for k, v in state.items() if ".lora_" in k}


def merge_lora_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Plain weights from a LoRA-injected state dict: base + scaling * B @ A, adapter tensors dropped
    (scaling 0 gives the frozen base alone).

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
            if leaf == "weight" and scaling:
                a = state[f"{prefix}.lora_A.{ADAPTER}.weight"].to(value.dtype)  # (r, in)
                b = state[f"{prefix}.lora_B.{ADAPTER}.weight"].to(value.dtype)  # (out, r)
                value = value + scaling * (b @ a)
            key = f"{prefix}.{leaf}"
        merged[key] = value
    return merged
