"""Micro-batches as the trainer, the reference and the critic run them: which rows go together (a token budget),
and how they go through the model (packed into one sequence, or right-padded).

Packing (trainer.packing): a micro-batch's rows are concatenated into one (1, T) sequence, T their real tokens, with
`position_ids` restarting at 0 on each row and no attention mask. Attention stays within each row, read from those
restarts: under sdpa the loaders pick rlkit.training.attention's per-row sdpa (causal SDPA on each row, rows of one length
batched, no mask: it costs the rows' sum of L_i^2), flash-attention takes the position_ids as varlen boundaries, and
eager gets transformers' dense (T, T) block-diagonal mask (`masking_utils.find_packed_sequence_indices`). transformers
reads the restarts only without a KV cache (with one, the rows silently attend to each other), so every forward here
passes use_cache=False. No compute is spent on padding, and the log-prob kernel and the critic's head read the
response positions alone; the losses see the usual (B, L-1) tables, zero elsewhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """A micro-batch (B, L) as the model runs it, and where its response targets are.

    Target position t of row i predicts input_ids[i, t + 1] from the hidden state at t; `source` is that state's
    index in the forward's flattened hidden states (S, H), `dest` the target's index in the flattened (B, L-1) table.
    """

    input_ids: torch.Tensor  # (1, T) packed or (B, W) padded, W the micro-batch's longest row
    attention_mask: torch.Tensor | None  # (B, W) when padded; None when packed (position_ids mark the rows)
    position_ids: torch.Tensor | None  # (1, T) restarting at 0 on each row when packed; None when padded
    source: torch.Tensor  # (N,) long, N response targets
    dest: torch.Tensor  # (N,) long
    targets: torch.Tensor  # (N,) long, the target tokens
    shape: tuple[int, int]  # (B, L-1), the table the values go back to

    def hidden(self, body: torch.nn.Module, autocast: torch.dtype | None = None) -> torch.Tensor:
        """(N, H) hidden states of `body` (a transformer without its head) at the response targets' positions."""
        device = self.input_ids.device.type
        with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
            out = body(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                       use_cache=False)
        return out.last_hidden_state.flatten(0, 1)[self.source]  # (S, H) -> (N, H)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) per-target values -> (B, L-1), zero off the response (differentiable; a new tensor, not a view,
        which FSDP2's backward hook on the root's output needs)."""
        width = self.shape[1]
        return values.new_zeros(self.shape).index_put((self.dest // width, self.dest % width), values)


def _response_targets(input_ids: torch.Tensor, response_mask: torch.Tensor):
    """(rows, positions, targets, dest) of the response targets, each (N,), in row-major order."""
    rows, positions = response_mask.nonzero(as_tuple=True)  # (N,), (N,)
    targets = input_ids[rows, positions + 1]
    return rows, positions, targets, rows * response_mask.shape[1] + positions


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> Layout:
    """Right-padded rows (B, L) -> one (1, T) sequence of their real tokens, positions restarting per row.

    >>> ids = torch.tensor([[5, 6, 7], [8, 9, 0]]); att = torch.tensor([[1, 1, 1], [1, 1, 0]])
    >>> lay = pack_rows(ids, att, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    >>> lay.input_ids.tolist(), lay.position_ids.tolist(), lay.source.tolist(), lay.targets.tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]], [1, 3], [7, 9])
    """
    lengths = attention_mask.sum(-1)  # (B,)
    real = attention_mask.bool()
    offsets = torch.cumsum(lengths, 0) - lengths  # (B,) where each row starts in the packed sequence
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (B, L)
    rows, pos, targets, dest = _response_targets(input_ids, response_mask)
    return Layout(input_ids[real][None], None, positions[real][None], offsets[rows] + pos, dest, targets,
                  tuple(response_mask.shape))


def pad_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> Layout:
    """Right-padded rows (B, L), cut to the micro-batch's longest row W, with their attention mask."""
    width = int(attention_mask.sum(-1).max())
    rows, pos, targets, dest = _response_targets(input_ids, response_mask)
    return Layout(input_ids[:, :width], attention_mask[:, :width], None, rows * width + pos, dest, targets,
                  tuple(response_mask.shape))


def layout_rows(input_ids, attention_mask, response_mask, packing: bool) -> Layout:
    return (pack_rows if packing else pad_rows)(input_ids, attention_mask, response_mask)


# -- which rows go together ----------------------------------------------------------------------------------
def token_budget_split(lengths: list[int], budget: int, max_rows: int, min_count: int = 0) -> list[list[int]]:
    """Row indices of each micro-batch, holding at most `budget` tokens and `max_rows` rows (first-fit decreasing).

    Rows go longest first into the first micro-batch they fit. A row longer than the budget gets a micro-batch of
    its own: it is never cut, since its tokens attend to each other. With `min_count` (<= len(lengths)), the
    micro-batch with the most tokens among those of 2+ rows is halved until there are that many: FSDP2 ranks must
    all run the same number of forwards, and halving never breaks the budget. Each micro-batch lists its rows in
    ascending order.

    >>> token_budget_split([5, 9, 3, 4, 12, 2], budget=12, max_rows=8)
    [[4], [1, 2], [0, 3, 5]]
    """
    if min_count > len(lengths):
        raise ValueError(f"cannot split {len(lengths)} rows into {min_count} micro-batches")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k in range(len(bins)) if loads[k] + lengths[i] <= budget and len(bins[k]) < max_rows), None)
        if k is None:
            bins.append([])
            loads.append(0)
            k = len(bins) - 1
        bins[k].append(i)
        loads[k] += lengths[i]
    while len(bins) < min_count:
        k = max((k for k in range(len(bins)) if len(bins[k]) > 1), key=lambda k: loads[k])
        rows = bins[k]  # longest first: dealing them alternately gives two halves of similar load
        bins[k], half = rows[0::2], rows[1::2]
        bins.append(half)
        loads[k] = sum(lengths[i] for i in bins[k])
        loads.append(sum(lengths[i] for i in half))
    return [sorted(b) for b in bins]


def split_micro_batches(lengths: list[int], max_rows: int, budget: int = 0, unit: int = 1,
                        min_count: int = 0) -> list[list[int]]:
    """Row indices of each micro-batch. Without a `budget`: consecutive runs of `max_rows` rows. With one:
    `token_budget_split` over units of `unit` consecutive rows (DPO's chosen/rejected pairs stay together and in
    order), `min_count` counting micro-batches.

    >>> split_micro_batches([3, 1, 4, 1, 5], max_rows=2)
    [[0, 1], [2, 3], [4]]
    >>> split_micro_batches([3, 1, 4, 1], max_rows=4, budget=5, unit=2)
    [[2, 3], [0, 1]]
    """
    if not budget:
        return [list(range(i, min(i + max_rows, len(lengths)))) for i in range(0, len(lengths), max_rows)]
    units = [sum(lengths[i : i + unit]) for i in range(0, len(lengths), unit)]
    plan = token_budget_split(units, budget, max(1, max_rows // unit), min_count)
    return [[u * unit + j for u in mb for j in range(unit)] for mb in plan]


def balance_rows(lengths: list[int], ranks: int, unit: int = 1) -> list[list[int]]:
    """Row indices of each of `ranks` trainer ranks: the same number of rows each, token loads balanced.

    FSDP2 ranks meet at every collective, so the step runs at the pace of the rank with the most tokens; and a
    step batch comes prompt-major (B prompts x G samples), so contiguous shares can give one rank all the long
    ones. Units of `unit` consecutive rows (DPO's chosen/rejected pairs) go longest first to the least-loaded rank
    that still has room (greedy LPT with equal counts, like verl's get_seqlen_balanced_partitions, which uses
    Karmarkar-Karp). Each rank lists its rows in ascending order; one rank takes [0, n) as it is.

    >>> balance_rows([9, 8, 1, 1], ranks=2)  # contiguous shares would carry 17 and 2 tokens
    [[0, 3], [1, 2]]
    """
    if len(lengths) % (ranks * unit):
        whole = f" (whole units of {unit} rows each)" if unit > 1 else ""
        raise ValueError(f"{len(lengths)} rows do not split evenly over {ranks} trainer ranks{whole}")
    room = len(lengths) // (ranks * unit)  # units per rank
    units = [sum(lengths[i : i + unit]) for i in range(0, len(lengths), unit)]
    shares: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for u in sorted(range(len(units)), key=lambda u: (-units[u], u)):
        r = min((r for r in range(ranks) if len(shares[r]) < room), key=lambda r: (loads[r], r))
        shares[r].append(u)
        loads[r] += units[u]
    return [[u * unit + j for u in sorted(share) for j in range(unit)] for share in shares]
