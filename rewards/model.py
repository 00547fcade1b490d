"""A trained reward model as a reward (`name: model`): a Bradley-Terry outcome model or a process reward model (PRM)
trained by a `reward_model` stage (rlkit.algorithms.reward_model), or any Hugging Face sequence-classification folder.

- Outcome model (AutoModelForSequenceClassification, one label): the score is its scalar at the last token that is not
  padding, as transformers reads it, of the prompt and completion rendered the way the stage rendered its training
  pairs (the rendering is in the folder's rlkit_stage.json: chat template or BOS + text, system prompt, prompt
  template, stop tokens).
- Process model (AutoModelForTokenClassification, two labels, as TRL's PRMTrainer): the completion is split into steps
  at `step_separator`; each step (its text then the separator, tokenized step by step as the stage trained) gets
  p = softmax(logits)[1] at the separator's last token, the probability that the step is correct; `aggregate`
  combines them: `min` (the weakest step), `product` (all steps correct) or `last`.

Per batch, `normalize` turns the raw scores into z-scores over the batch and `clip` bounds them to [-clip, clip]; the
raw score is kept as the `raw` component. The verdict is CORRECT when the raw score is above `threshold` (default 0
for an outcome model, 0.5 for a process model's aggregate). A sample longer than the model's context is an ERROR,
never a silent 0; an empty completion has no step a process model could call correct and scores 0 (wrong).

The reward is batched (`score_batch`): the scorer runs it on whole batches in its own process (its own Ray actor on
cluster.backend ray, which then takes cluster.gpus_per_engine GPUs), on the GPU when there is one. This module
imports torch and transformers only when the model loads.
"""

from __future__ import annotations

import json
import math
import statistics
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

from rlkit.rewards.base import RewardResult, Sample, Verdict

AGGREGATES = ("min", "product", "last")
OUTCOME, PROCESS = "outcome", "process"


def split_steps(text: str, separator: str) -> list[str]:
    """A completion's steps: its text split at `separator`, empty steps (a trailing separator) dropped.

    >>> split_steps("12+3=15\\n15*2=30\\n", "\\n"), split_steps("", "\\n")
    (['12+3=15', '15*2=30'], [])
    """
    return [step for step in text.split(separator) if step.strip()]


def step_ids(encode: Callable[[str], list[int]], steps: Sequence[str], separator: str) -> tuple[list[int], list[int]]:
    """(ids, ends) of a stepwise completion as TRL's PRMTrainer tokenizes one: each step on its own, then the
    separator; `ends` are the positions (in `ids`) of each separator's last token, where that step is scored.

    >>> step_ids(lambda text: [ord(c) for c in text], ["ab", "c"], "\\n")
    ([97, 98, 10, 99, 10], [2, 4])
    """
    ids: list[int] = []
    ends = []
    sep = encode(separator)
    for step in steps:
        ids += encode(step) + sep
        ends.append(len(ids) - 1)
    return ids, ends


def aggregate_steps(probs: Sequence[float], how: str) -> float:
    """One score from a solution's per-step probabilities of being correct.

    >>> [aggregate_steps([0.5, 0.25, 1.0], how) for how in AGGREGATES]  # min, product, last
    [0.25, 0.125, 1.0]
    """
    if not probs:
        raise ValueError("no step to score")
    if how == "min":
        return min(probs)
    if how == "product":
        return math.prod(probs)
    return probs[-1]


def normalize_scores(scores: Sequence[float], normalize: bool, clip: float) -> list[float]:
    """The batch's scores as the reward gives them: z-scores over the batch when `normalize` (a batch with one
    value, or all equal, is centred only), then bounded to [-clip, clip] when clip > 0.

    >>> normalize_scores([1.0, 3.0], True, 0.0), normalize_scores([1.0, 3.0], True, 0.5), normalize_scores([4.0], False, 2.0)
    ([-1.0, 1.0], [-0.5, 0.5], [2.0])
    """
    out = list(scores)
    if normalize and out:
        mean, std = statistics.fmean(out), statistics.pstdev(out)
        out = [(s - mean) / std if std > 1e-8 else s - mean for s in out]
    if clip > 0:
        out = [min(max(s, -clip), clip) for s in out]
    return out


def rendering(folder: Path) -> dict[str, Any]:
    """How the reward_model stage rendered its training sequences (its rlkit_stage.json), or for a folder from
    elsewhere: the tokenizer's chat template when it has one, no system prompt, the prompt as it is."""
    stage = folder / "rlkit_stage.json"
    saved = json.loads(stage.read_text()).get("reward_model", {}) if stage.is_file() else {}
    return {"chat": None, "system_prompt": "", "prompt_template": "{prompt}", "stop_ids": [], "step_separator": "\n",
            "kind": ""} | saved


class ModelReward:
    """Scores completions with a trained reward model (see the module docstring).

    >>> ModelReward("/no/such/folder")
    Traceback (most recent call last):
    ...
    ValueError: path: '/no/such/folder' is not a reward model folder (config.json, weights, tokenizer); give a reward_model stage's checkpoint
    """

    def __init__(self, path: str, aggregate: str = "min", normalize: bool = False, clip: float = 0.0,
                 threshold: float | None = None, batch_size: int = 16, device: str = "auto"):
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file() or not any(
                (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ValueError(f"path: '{path}' is not a reward model folder (config.json, weights, tokenizer); give a "
                             "reward_model stage's checkpoint")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate: '{aggregate}' is not one of {', '.join(AGGREGATES)}")
        if clip < 0 or batch_size < 1:
            raise ValueError(f"clip and batch_size: clip must be >= 0 and batch_size >= 1, got {clip}, {batch_size}")
        self.folder, self.aggregate, self.normalize, self.clip = folder, aggregate, normalize, clip
        self.batch_size, self.device_name = batch_size, device
        self.render_cfg = rendering(folder)
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or [""]
        self.kind = self.render_cfg["kind"] or (PROCESS if architectures[0].endswith("TokenClassification")
                                                else OUTCOME)
        self.threshold = threshold if threshold is not None else (0.5 if self.kind == PROCESS else 0.0)

    # -- the model, loaded once, in the scorer's process ---------------------------------------------------
    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    @cached_property
    def model(self):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        auto = AutoModelForTokenClassification if self.kind == PROCESS else AutoModelForSequenceClassification
        device = self.device_name if self.device_name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model = auto.from_pretrained(self.folder, dtype=torch.float32 if device == "cpu" else "auto")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model.to(device).eval()

    @cached_property
    def context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    # -- rendering: as the stage rendered its training sequences ---------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def chat(self) -> bool:
        saved = self.render_cfg["chat"]
        return bool(getattr(self.tokenizer, "chat_template", None)) if saved is None else bool(saved)

    def _turns(self, prompt: str) -> list[dict[str, str]]:
        r = self.render_cfg
        turns = [{"role": "user", "content": r["prompt_template"].format(prompt=prompt)}]
        return ([{"role": "system", "content": r["system_prompt"]}] if r["system_prompt"] else []) + turns

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's ids as rlkit.data.chat.Renderer.prompt_ids renders a text prompt."""
        tok, r = self.tokenizer, self.render_cfg
        if self.chat:
            return self._encode(tok.apply_chat_template(self._turns(prompt), tokenize=False, add_generation_prompt=True))
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        system = self._encode(r["system_prompt"] + "\n") if r["system_prompt"] else []
        return bos + system + self._encode(r["prompt_template"].format(prompt=prompt))

    def reply_ids(self, prompt: str, completion: str) -> list[int]:
        """The reply's ids as Renderer.reply_ids renders a text reply: the assistant turn through its stop token."""
        tok = self.tokenizer
        if not self.chat:
            return self._encode(completion) + [tok.eos_token_id]
        turns = self._turns(prompt)
        context = self._encode(tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
        through = self._encode(tok.apply_chat_template(turns + [{"role": "assistant", "content": completion}],
                                                       tokenize=False, add_generation_prompt=False))
        reply, stops = through[len(context):], set(self.render_cfg["stop_ids"]) | {tok.eos_token_id}
        end = next((i for i, t in enumerate(reply) if t in stops), None)
        return reply[: end + 1] if end is not None else reply + [tok.eos_token_id]

    def sequence(self, sample: Sample) -> tuple[list[int], list[int]]:
        """(ids, positions scored): an outcome model's whole sequence (read at its last non-pad token), or a process
        model's prompt and steps with each step's separator position."""
        prompt = self.prompt_ids(sample.prompt)
        if self.kind == OUTCOME:
            return prompt + self.reply_ids(sample.prompt, sample.completion), []
        steps = split_steps(sample.completion, self.render_cfg["step_separator"])
        ids, ends = step_ids(self._encode, steps, self.render_cfg["step_separator"])
        return prompt + ids, [len(prompt) + e for e in ends]

    # -- scoring ----------------------------------------------------------------------------------------------
    def score_batch(self, samples: list[Sample], engine=None) -> list[RewardResult]:
        """One result per sample, in order (`engine` is unused: the model runs here, in the scorer's process)."""
        rows = [self.sequence(s) for s in samples]
        raw: list[float | None] = [None] * len(samples)
        steps: list[list[float]] = [[] for _ in samples]
        errors: dict[int, str] = {}
        todo = []
        for i, (ids, ends) in enumerate(rows):
            if len(ids) > self.context:
                errors[i] = f"{len(ids)} tokens exceed the reward model's context ({self.context})"
            elif self.kind == PROCESS and not ends:  # an empty answer is the model's fault: no step is correct
                raw[i] = 0.0
            else:
                todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for i, values in zip(chunk, self._forward([rows[i] for i in chunk])):
                steps[i] = values
                raw[i] = values[0] if self.kind == OUTCOME else aggregate_steps(values, self.aggregate)
        scored = [i for i in range(len(samples)) if raw[i] is not None]
        final = dict(zip(scored, normalize_scores([raw[i] for i in scored], self.normalize, self.clip)))
        results = []
        for i in range(len(samples)):
            if i in errors:
                results.append(RewardResult(0.0, Verdict.ERROR, info={"error": errors[i]}))
                continue
            verdict = Verdict.CORRECT if raw[i] > self.threshold else Verdict.WRONG
            info = {"raw": raw[i]} | ({"steps": steps[i]} if self.kind == PROCESS else {})
            results.append(RewardResult(final[i], verdict, {"raw": raw[i]}, info))
        return results

    def _forward(self, rows: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Each row's scores: [the scalar] (outcome) or each step's probability of being correct (process)."""
        import torch

        pad, width = self.tokenizer.pad_token_id, max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (b, W) right-padded
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for k, (ids, _) in enumerate(rows):
            input_ids[k, : len(ids)], attention[k, : len(ids)] = torch.tensor(ids), 1
        device = self.model.device
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        if self.kind == OUTCOME:
            return [[float(v)] for v in logits[:, 0].cpu()]  # (b, 1): at the last non-pad token, as transformers reads
        probs = logits.softmax(-1)[..., 1].cpu()  # (b, W) p(step correct) at every position
        return [[float(probs[k, e]) for e in ends] for k, (_, ends) in enumerate(rows)]
