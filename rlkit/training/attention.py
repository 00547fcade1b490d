"""Attention over packed rows without a (T, T) mask: torch's scaled_dot_product_attention within each row.

With trainer.packing a micro-batch's rows run as one (1, T) sequence whose position_ids restart at 0 on each row
(rlkit.training.packing). transformers' own sdpa path then builds a dense (1, 1, T, T) block-diagonal mask, so attention costs
T^2 over the micro-batch instead of the sum of its rows' L_i^2; on CPU that made a packed update slower than a padded
one. "rlkit_varlen_sdpa" is registered through transformers' documented extension points instead (no model class is
patched): its mask function builds no mask when the forward has no attention_mask (packed rows), and its attention
function cuts query, key and value at the row boundaries and runs causal SDPA on each row, the way the
flash-attention path runs varlen on the same position_ids. A padded forward (a 2D attention_mask), a batch of more
than one row or a forward with a KV cache goes to transformers' sdpa unchanged, so one model serves both layouts.

`model_attn_implementation(trainer.attn_implementation, trainer.packing, dtype)` is the name every loader passes to
from_pretrained (policy, critic, reference). flash_attention_2 is varlen already and eager keeps its dense mask.
"auto", the default, is the fastest that runs: flash_attention_2 on a CUDA device with flash-attn installed and
half-precision compute, else sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARLEN_SDPA = "rlkit_varlen_sdpa"


def model_attn_implementation(attn_implementation: str, packing: bool, dtype: torch.dtype = torch.float32) -> str:
    """The attn_implementation to load a model with, whose forward computes in `dtype`: "auto" resolved
    (`flash_attention_runs`), and the per-row sdpa when rows are packed under sdpa.

    >>> model_attn_implementation("sdpa", packing=True), model_attn_implementation("sdpa", packing=False)
    ('rlkit_varlen_sdpa', 'sdpa')
    >>> model_attn_implementation("auto", packing=False, dtype=torch.float32)  # flash-attn takes half precision only
    'sdpa'
    """
    if attn_implementation == "auto":
        attn_implementation = "flash_attention_2" if flash_attention_runs(dtype) else "sdpa"
    if packing and attn_implementation == "sdpa":
        register_varlen_sdpa()
        return VARLEN_SDPA
    return attn_implementation


def flash_attention_runs(dtype: torch.dtype) -> bool:
    """Whether flash-attention 2 can run a forward computing in `dtype`: half precision (flash-attn has no float32
    kernels), and flash-attn >= 2.3.3 installed beside a CUDA device (transformers' own check)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def register_varlen_sdpa() -> None:
    """Register the attention and mask functions under VARLEN_SDPA (transformers' global interfaces; idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention_forward)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)


def varlen_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' mask hook: no mask without a 2D attention_mask (packed rows: the attention reads the rows from
    position_ids), else sdpa's (B, 1, q, kv) boolean mask of the padded batch, or None where it is plain causal."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function or causal_mask_function,
                     attention_mask, **kwargs)


def varlen_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention hook. query (B, h, T, d), key and value (B, kv, S, d) -> ((B, T, h, d), None).

    Rows are packed when there is no mask, one sequence (B = 1) and no cache (T = S); their boundaries come from
    `cu_seq_lens_q` (R + 1,) when the caller passes it (flash-attention's varlen kwarg), else from `position_ids`
    (1, T), where a position that does not follow its predecessor by 1 starts a row (as transformers'
    find_packed_sequence_indices reads them). Anything else is transformers' sdpa. A model whose attention gets
    neither (all transformers' decoders pass position_ids on) would attend across rows: keep such a model on
    packing=false."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids, cu_seq_lens = kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
    packed = (attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
              and (position_ids is not None or cu_seq_lens is not None))
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("position_bias") is not None:  # a learned bias over (T, T): no per-row cut of it here
        raise NotImplementedError(f"{VARLEN_SDPA} takes no position_bias; set trainer.packing=false")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    out = _attend_rows(query, key, value, position_ids, cu_seq_lens, dropout, scaling, causal, gqa,
                       kwargs.get("sliding_window"))  # (1, h, T, d)
    return out.transpose(1, 2).contiguous(), None  # (1, T, h, d), no attention weights (as sdpa)


def row_lengths(position_ids: torch.Tensor | None, cu_seq_lens: torch.Tensor | None = None) -> list[int]:
    """Lengths of the packed rows of a (1, T) sequence, from cumulative lengths (R + 1,) or position ids (1, T).

    >>> row_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    [3, 2, 1]
    """
    if cu_seq_lens is not None:
        return cu_seq_lens.diff().tolist()
    pos = position_ids[0]  # (T,)
    starts = (pos.diff(prepend=pos[:1] + 1) != 1).nonzero().flatten()  # (R,) the first token of each row
    return starts.diff(append=starts.new_tensor([pos.numel()])).tolist()


# Under trainer.compile (rlkit.training.rank.compile_blocks) the loop below runs eager: the number of rows and their lengths
# are data, so a traced loop would recompile for every micro-batch. The block's graph breaks around this call only.
@torch.compiler.disable
def _attend_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor | None,
                 cu_seq_lens: torch.Tensor | None, dropout: float, scaling: float | None, causal: bool, gqa: bool,
                 sliding_window: int | None) -> torch.Tensor:
    """Causal SDPA within each row of a packed (1, h, T, d) query and (1, kv, T, d) key/value -> (1, h, T, d).

    Rows of one length run as one batched call, (k, h, L, d): no padding, so no mask, and exactly each row's own
    attention. The rows' outputs go back to their places in the packed order."""
    lengths = row_lengths(position_ids, cu_seq_lens)
    if sliding_window is not None and max(lengths) > sliding_window:
        raise NotImplementedError(
            f"packed rows of up to {max(lengths)} tokens under a {sliding_window}-token sliding window: "
            f"{VARLEN_SDPA} attends to the whole row; set trainer.packing=false or attn_implementation=eager")
    if len(lengths) == 1:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=causal,
                                              enable_gqa=gqa)
    rows = list(zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)))  # R x (1, ., L_i, d)
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(rows)
    for group in by_length.values():
        q, k, v = rows[group[0]] if len(group) == 1 else [torch.cat([rows[i][j] for i in group]) for j in range(3)]
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=causal,
                                           enable_gqa=gqa)  # (g, h, L, d)
        for i, row in zip(group, o.split(1)):
            out[i] = row
    return torch.cat(out, 2)  # (1, h, T, d)
