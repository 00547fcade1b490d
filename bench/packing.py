"""Packed vs padded micro-batches: forward + backward time of one micro-batch, same rows, same model, one run.

    python bench/packing.py [--model DIR] [--attn sdpa] [--dtype auto] [--repeats 3]

Packed (trainer.packing: true): the rows as one (1, T) sequence, position_ids restarting per row, through the
attention trainer.packing loads (rlkit.training.attention.model_attn_implementation): with sdpa, rlkit.training.attention's per-row
sdpa (attention within each row, no mask); flash_attention_2 (CUDA) is varlen itself. Padded (false): (B, W) rows
with an attention mask, W the longest row, through the same model (padded forwards run transformers' sdpa). Rows
have lengths drawn uniformly from [L/2, L], as sampled completions do. With sdpa the table also times the packed rows
through transformers' own sdpa ("dense mask"): a (T, T) block-diagonal mask, attention growing with the square of
the micro-batch's total tokens (what packing ran before rlkit.training.attention); eager always builds that mask. The table
prints medians and ratios to padded; only ratios from the same run compare (this machine's speed varies by day).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlkit.training.attention import model_attn_implementation  # noqa: E402


def build(model: str, attn: str, dtype: torch.dtype):
    attn = model_attn_implementation(attn, packing=True)  # as the trainer loads it with packing
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model:
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         attn_implementation=attn)  # SmolLM2-135M's shape, randomly initialised
    return LlamaForCausalLM(config).to(dtype)


def rows(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) right-padded token ids and their attention mask, row lengths uniform in [L/2, L]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids * mask, mask


def step(lm, ids: torch.Tensor, mask: torch.Tensor, packed: bool) -> float:
    """Seconds of one forward + backward of the body's summed last hidden state over real tokens."""
    t0 = time.perf_counter()
    if packed:
        real = mask.bool()
        positions = torch.arange(ids.shape[1]).expand_as(ids)[real][None]  # (1, T), restarting per row
        out = lm.model(input_ids=ids[real][None], position_ids=positions, use_cache=False).last_hidden_state
        total = out.float().sum()
    else:
        width = int(mask.sum(-1).max())
        out = lm.model(input_ids=ids[:, :width], attention_mask=mask[:, :width], use_cache=False).last_hidden_state
        total = (out.float() * mask[:, :width, None]).sum()
    total.backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a Hugging Face folder (default: SmolLM2-135M's shape, random)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="auto: bfloat16 where this CPU computes it natively, else float32 (rlkit.kernels.precision)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from rlkit.kernels.precision import auto_dtype, describe_machine

    print(describe_machine(), flush=True)  # the numbers below depend on it (native bf16 or not)
    if args.dtype == "auto":
        args.dtype = auto_dtype("cpu")[0]
    lm = build(args.model, args.attn, getattr(torch, args.dtype))
    loaded = lm.config._attn_implementation
    dense = args.attn == "sdpa"  # also time the packed rows through transformers' sdpa, over the dense mask
    print("| rows x max length | tokens | padded s | packed s | packed / padded |"
          + (" dense mask s | dense mask / padded |" if dense else "")
          + f"  ({loaded}, {args.dtype}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|---|" + ("---|---|" if dense else ""))
    for batch, length in ((8, 80), (32, 80), (64, 80), (8, 300)):
        ids, mask = rows(batch, length, lm.config.vocab_size)
        times = {"padded": [], "packed": [], "dense": []}
        for _ in range(args.repeats):
            for name in times if dense else ("padded", "packed"):
                lm.set_attn_implementation("sdpa" if name == "dense" else loaded)
                lm.zero_grad(set_to_none=True)
                times[name].append(step(lm, ids, mask, packed=name != "padded"))
        pad, pack = statistics.median(times["padded"]), statistics.median(times["packed"])
        line = f"| {batch} x {length} | {int(mask.sum())} | {pad:.2f} | {pack:.2f} | {pack / pad:.2f} |"
        if dense:
            line += f" {statistics.median(times['dense']):.2f} | {statistics.median(times['dense']) / pad:.2f} |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
