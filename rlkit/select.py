"""`python -m rlkit.select --model PATH --input sft.jsonl --output selected.jsonl [--fraction 0.3]`: data selection
by Instruction-Following Difficulty (Li et al., 2024, "From Quantity to Quality"; Superfiltering scores it with a
small model).

IFD = L(answer | prompt) / L(answer): the per-token NLL of the answer with its prompt over the NLL without it.
Near 0 the prompt makes the answer easy (little left to learn); near 1 the prompt barely helps (hard, informative);
above 1 the prompt misleads (the answer does not follow from it) and the example is dropped. Two guards: both
losses below `min_loss` (the scorer already knows the answer by heart) and both above `max_loss` (noise the scorer
cannot model at all) are dropped too. The rest are ranked by IFD, highest first, and the top `fraction` of the
input count is written: each input row as it was, with its `ifd`, `loss_conditioned` and `loss_answer`.

The input is read as a recipe's data is (rlkit.data.sources: .jsonl/.json/.parquet/.csv, prompt-only rows with an
answer or solution, or prompt-completion rows) and prompts are rendered as in training (rlkit.data.chat: the model's
chat template unless `--chat-template none`, with `--system-prompt` and `--prompt-template`). The answer alone is
scored after an empty user turn (with a template) or BOS alone (without), its stop token left out as the paper does.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from rlkit.recipe import DataConfig, RecipeError
from rlkit.data.tasks import Problem


@dataclass(frozen=True)
class SelectOptions:
    fraction: float = 0.3  # share of the input written
    min_loss: float = 0.05  # nats/token: both losses below it, the answer is already known
    max_loss: float = 6.0  # nats/token: both losses above it, the example is noise to the scorer
    batch_size: int = 64


@dataclass(frozen=True)
class Scored:
    index: int
    loss_conditioned: float
    loss_answer: float

    @property
    def ifd(self) -> float:
        return self.loss_conditioned / max(self.loss_answer, 1e-9)


def choose(scored: list[Scored], options: SelectOptions, total: int) -> tuple[list[Scored], dict[str, int]]:
    """The examples to keep, highest IFD first, and how many each guard dropped.

    >>> rows = [Scored(0, 0.9, 1.0), Scored(1, 0.2, 1.0), Scored(2, 1.5, 1.0), Scored(3, 0.01, 0.02),
    ...         Scored(4, 7.0, 8.0), Scored(5, 0.5, 1.0)]
    >>> kept, dropped = choose(rows, SelectOptions(fraction=0.5), total=6)
    >>> [s.index for s in kept], dropped
    ([0, 5, 1], {'misaligned': 1, 'known': 1, 'noise': 1})
    """
    dropped = {"misaligned": 0, "known": 0, "noise": 0}
    eligible = []
    for s in scored:
        if max(s.loss_conditioned, s.loss_answer) < options.min_loss:
            dropped["known"] += 1
        elif min(s.loss_conditioned, s.loss_answer) > options.max_loss:
            dropped["noise"] += 1
        elif s.ifd > 1.0:
            dropped["misaligned"] += 1
        else:
            eligible.append(s)
    eligible.sort(key=lambda s: (-s.ifd, s.index))
    return eligible[: round(options.fraction * total)], dropped


@torch.no_grad()
def answer_losses(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                  batch_size: int) -> list[float]:
    """Per-token NLL of each answer's ids after its prompt's ids."""
    from rlkit.training.trainer import batched_logprobs
    from rlkit.training.batches import pack_sequences

    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = pack_sequences(prompts[start:start + batch_size], answers[start:start + batch_size], pad_id)
        logprobs = batched_logprobs(model, batch, batch_size, impl="torch")  # (b, L-1), zero off the answer
        out += (-logprobs.sum(-1) / batch.response_mask.sum(-1)).tolist()
    return out


def read_problems(path: str, data: DataConfig) -> tuple[list[dict], list[Problem]]:
    """The input's rows and their problems (prompt with an answer or solution, or a text prompt-completion)."""
    from rlkit.data.sources import read_rows, to_records

    rows = read_rows(path, "", "train", "--input")
    _, problems = to_records(rows, range(len(rows)), data, "--input", path)
    for i, p in enumerate(problems):
        if not isinstance(p, Problem) or not p.solution:
            raise RecipeError(f"--input: {path} row {i + 1} is not a prompt with an answer (--answer-key), a solution "
                              "(--solution-key) or a text completion; IFD scores an answer after its prompt")
    return rows, problems


def score_file(model_path: str, path: str, data: DataConfig, batch_size: int):
    """(input rows, Scored per row) for a file of prompts with answers or solutions."""
    from rlkit.data.chat import Renderer, stop_token_ids
    from rlkit.training.modeling import load_model_and_tokenizer

    rows, problems = read_problems(path, data)
    model, tokenizer = load_model_and_tokenizer(model_path, field="--model")
    model.eval()
    renderer = Renderer(tokenizer, data, stop_token_ids(model_path))
    answers = [strip_stop(renderer.reply_ids(p, p.solution), renderer.stop_ids) for p in problems]
    conditioned = answer_losses(model, [renderer.prompt_ids(p) for p in problems], answers, renderer.pad_id,
                                batch_size)
    alone_prompt = empty_prompt(renderer)
    alone = answer_losses(model, [alone_prompt] * len(problems), answers, renderer.pad_id, batch_size)
    return rows, [Scored(i, c, a) for i, (c, a) in enumerate(zip(conditioned, alone))]


def strip_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """A reply without its final stop token: after a bare answer the model expects more prompt, and the stop
    token would dominate the unconditioned loss (the IFD paper leaves EOS out)."""
    return ids[:-1] if len(ids) > 1 and ids[-1] in stop_ids else ids


def empty_prompt(renderer) -> list[int]:
    """What the answer alone follows: an empty user turn with a chat template; BOS (else EOS) without one."""
    if renderer.chat:
        return renderer.prompt_ids(Problem("", "", "", messages=({"role": "user", "content": ""},)))
    tok = renderer.tokenizer
    return [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]


def main(argv: list[str] | None = None) -> int:
    defaults = SelectOptions()
    parser = argparse.ArgumentParser(prog="python -m rlkit.select", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint of the scoring model")
    parser.add_argument("--input", required=True,
                        help=".jsonl/.json/.parquet/.csv of prompt / answer (/ solution) or prompt / completion rows")
    parser.add_argument("--output", required=True, help="where the selected records go (JSONL)")
    parser.add_argument("--fraction", type=float, default=defaults.fraction)
    parser.add_argument("--min-loss", type=float, default=defaults.min_loss)
    parser.add_argument("--max-loss", type=float, default=defaults.max_loss)
    parser.add_argument("--prompt-key", default=DataConfig.prompt_key)
    parser.add_argument("--answer-key", default=DataConfig.answer_key)
    parser.add_argument("--solution-key", default=DataConfig.solution_key)
    parser.add_argument("--chat-template", choices=("auto", "none"), default=DataConfig.chat_template)
    parser.add_argument("--system-prompt", default=DataConfig.system_prompt)
    parser.add_argument("--prompt-template", default=DataConfig.prompt_template)
    args = parser.parse_args(argv)
    options = SelectOptions(args.fraction, args.min_loss, args.max_loss)
    data = DataConfig(prompt_key=args.prompt_key, answer_key=args.answer_key, solution_key=args.solution_key,
                      chat_template=args.chat_template, system_prompt=args.system_prompt,
                      prompt_template=args.prompt_template)
    try:
        if not 0.0 < options.fraction <= 1.0 or not 0.0 <= options.min_loss < options.max_loss:
            raise RecipeError("--fraction must be in (0, 1] and 0 <= --min-loss < --max-loss")
        rows, scored = score_file(args.model, args.input, data, options.batch_size)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kept, dropped = choose(scored, options, len(rows))
    with open(args.output, "w") as f:
        for s in kept:
            f.write(json.dumps(rows[s.index] | {"ifd": s.ifd, "loss_conditioned": s.loss_conditioned,
                                                "loss_answer": s.loss_answer}) + "\n")
    print(f"scored {len(rows)} examples; dropped {dropped['misaligned']} misaligned (IFD > 1), {dropped['known']} "
          f"known (both losses < {options.min_loss}), {dropped['noise']} noise (both > {options.max_loss}); "
          f"wrote {len(kept)} to {args.output}")
    if len(kept) < round(options.fraction * len(rows)):
        print(f"warning: fewer eligible examples than --fraction {options.fraction} asks for", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
