"""What an engine returns for a batch of prompts: every completion's token ids and log-probs in two flat arrays.

An engine on Ray pickles its answer to the driver. As per-token Python objects (a tuple of ints and one of floats
per completion) that is a Python object per token on both sides; as flat numpy arrays with offsets it is one buffer
each, whatever the number of tokens (bench/driver_bytes.py measures both). `Generations` reads like the
[prompt][sample] lists of `Completion` it replaces, each completion's arrays being views into the flat ones, so a
stage indexes it as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True, eq=False)
class Completion:
    """One sampled completion. From an engine its arrays are views into its batch's `Generations`; a hand-made one
    may hold any sequences (tuples in tests)."""

    token_ids: np.ndarray  # (L,) int32 sampled tokens, EOS included when the model stopped
    logprobs: np.ndarray  # (L,) float32 log-prob of each sampled token under the engine's weights
    text: str
    finished: bool  # False when cut at max_new_tokens (truncated)


@dataclass(frozen=True, eq=False)
class Generations:
    """n completions for each of P prompts, prompt-major and flat: completion k (sample k % n of prompt k // n) is
    tokens offsets[k]:offsets[k + 1]. Indexing gives prompt i's list of n `Completion`s.

    >>> g = Generations.from_lists([[([5, 6], [-0.5, -0.25], "ab", True), ([7], [-1.0], "c", False)]])
    >>> len(g), g[0][0].token_ids.tolist(), g[0][1].logprobs.tolist(), g[0][1].finished
    (1, [5, 6], [-1.0], False)
    >>> [c.text for c in Generations.concat([g, g]).samples()]
    ['ab', 'c', 'ab', 'c']
    """

    token_ids: np.ndarray  # (T,) int32, every completion's tokens end to end
    logprobs: np.ndarray  # (T,) float32, the sampled tokens' log-probs
    offsets: np.ndarray  # (P*n + 1,) int64, offsets[0] = 0, offsets[-1] = T
    texts: tuple[str, ...]  # (P*n,)
    finished: np.ndarray  # (P*n,) bool
    n: int  # samples per prompt

    def __len__(self) -> int:  # prompts
        return (len(self.offsets) - 1) // self.n

    def completion(self, k: int) -> Completion:
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        return Completion(self.token_ids[a:b], self.logprobs[a:b], self.texts[k], bool(self.finished[k]))

    def __getitem__(self, i: int) -> list[Completion]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt {i} of {len(self)}")
        i %= len(self)
        return [self.completion(i * self.n + j) for j in range(self.n)]

    def __iter__(self) -> Iterator[list[Completion]]:
        return (self[i] for i in range(len(self)))

    def samples(self) -> list[Completion]:
        """(P*n,) every completion, prompt-major."""
        return [self.completion(k) for k in range(len(self.texts))]

    @staticmethod
    def from_lists(groups: Sequence[Sequence[tuple]], n: int | None = None) -> "Generations":
        """From [prompt][sample] tuples (token_ids, logprobs, text, finished); `n` when there are no prompts."""
        flat = [c for g in groups for c in g]
        n = n or (len(groups[0]) if groups else 1)
        if any(len(g) != n for g in groups):
            raise ValueError(f"every prompt needs {n} completions, got {[len(g) for g in groups]}")
        lengths = [len(c[0]) for c in flat]
        return Generations(np.fromiter((t for c in flat for t in c[0]), np.int32, sum(lengths)),
                           np.fromiter((x for c in flat for x in c[1]), np.float32, sum(lengths)),
                           np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
                           tuple(c[2] for c in flat), np.array([bool(c[3]) for c in flat], bool), n)

    @staticmethod
    def concat(parts: Sequence["Generations"]) -> "Generations":
        """The parts' prompts in order (one engine's answer each, in a pool); they share one n."""
        if not parts:
            raise ValueError("no generations to concatenate")
        n = parts[0].n
        if any(p.n != n for p in parts):
            raise ValueError(f"generations of different n: {[p.n for p in parts]}")
        if len(parts) == 1:
            return parts[0]
        starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        return Generations(np.concatenate([p.token_ids for p in parts]), np.concatenate([p.logprobs for p in parts]),
                           np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, starts)]),
                           tuple(t for p in parts for t in p.texts), np.concatenate([p.finished for p in parts]), n)


def token_list(tokens) -> list[int]:
    """A completion's or an episode's token ids as Python ints, whatever holds them (an engine's array, a tuple).

    >>> token_list(np.array([3, 4], np.int32)), token_list((5,))
    ([3, 4], [5])
    """
    return np.asarray(tokens, dtype=np.int64).tolist()
