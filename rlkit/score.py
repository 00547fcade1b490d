"""`python -m rlkit.score RECIPE.yaml --input samples.jsonl [key=value ...]`: score completions with a recipe's rewards.

Each input line is a JSON object with `prompt`, `completion` and the reference as `gold` (or `answer`);
`task` and `meta` are optional. Conversational rows (TRL's format: `prompt` and `completion` as lists of
{role, content} messages) are scored on the text a reward sees in training: the last user turn as the prompt,
the assistant turns' text as the completion. Prints a summary: count, mean score, each reward's mean, verdict counts,
errors and timeouts, and the honesty reward's calibration when the recipe uses it. `--output` writes one
scored line per sample. Bad input (a missing file, a malformed line) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlkit.recipe import RecipeError, load_recipe
from rlkit.runtime.scoring import build_scorer, live_rewards


class InputError(ValueError):
    """The samples file cannot be read; the message names the file and line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlkit.score", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML whose `reward` section is used, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. reward.num_workers=4")
    parser.add_argument("--input", required=True, help="JSONL with prompt, completion and gold (or answer)")
    parser.add_argument("--output", help="write each sample's score, verdict and components here (JSONL)")
    return parser.parse_intermixed_args(argv)


def read_samples(path: str) -> list:
    """Samples from a JSONL file; the first bad line raises InputError naming its number."""
    from rlkit.rewards.base import Sample

    file = Path(path)
    if not file.is_file():
        raise InputError(f"--input: file '{path}' not found")
    samples = []
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object with 'prompt', 'completion' and 'gold'")
            try:
                prompt = message_text(row.get("prompt", ""), "prompt")
                completion = message_text(row.get("completion"), "completion")
            except ValueError as e:
                raise InputError(f"{path}:{number}: {e}") from None
            gold = row.get("gold", row.get("answer"))
            samples.append(Sample(prompt, completion, gold, str(row.get("task", "")), row.get("meta") or {}))
    if not samples:
        raise InputError(f"{path}: no samples")
    return samples


def message_text(value, field: str) -> str:
    """A field's text: itself, or for conversational data the last user turn (prompt) or the assistant turns."""
    from rlkit.data.sources import RowError, last_user_text, parse_messages

    if isinstance(value, str):
        return value
    try:
        messages = parse_messages(value, field, "row")
    except RowError as e:
        raise ValueError(f"'{field}' must be text or a list of {{role, content}} messages ({e})") from None
    if field == "prompt":
        return last_user_text(messages)
    return "\n".join(m["content"] for m in messages if m["role"] == "assistant")


def format_summary(out, labels: list[str]) -> str:
    """The stats of a ScoreOutput as an aligned two-column table."""
    n = len(out.scores)
    rows = [("samples", str(n)), ("valid", str(sum(out.valid))),
            ("score (mean over valid)", f"{out.stats['score/mean']:.4f}")]
    for label in labels:
        rows.append((f"{label} (mean)", f"{out.stats[f'{label}/mean']:.4f}"))
    for key in sorted(k for k in out.stats if k.startswith("verdict/")):
        count = int(out.stats[key])
        rows.append((key, f"{count} ({count / n:.1%})"))
    rows += [("errors", str(int(out.stats["errors"]))), ("timeouts", str(int(out.stats["timeouts"])))]
    extras = [k for k in out.stats if "/" in k and k.split("/")[0] in labels and k.split("/")[1] not in ("mean", "std")]
    rows += [(key, f"{out.stats[key]:.4f}") for key in extras]  # e.g. honesty/selective_risk
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_scored(path: str, out) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for score, result, valid in zip(out.scores, out.results, out.valid):
            record = {"score": score, "valid": valid, "verdict": result.verdict.value,
                      "components": dict(result.components), "info": result.info}
            f.write(json.dumps(record, default=repr) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        samples = read_samples(args.input)
        # a model reward that names a reward_model stage scores with that stage's checkpoint in the recipe's run folder
        reward = live_rewards(cfg, cfg.logging.output_dir, len(cfg.stages))
        with build_scorer(reward) as scorer:  # only once the inputs are known to be good
            out = scorer.score(samples)
            labels = scorer.labels
    except (RecipeError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # RewardError under reward.on_error=fail, or a worker that cannot start
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(out, labels))
    if args.output:
        write_scored(args.output, out)
    return 0


if __name__ == "__main__":  # the scorer's worker processes are spawned and re-import the main module
    sys.exit(main())
