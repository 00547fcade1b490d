"""`python -m rlkit.score` as a user runs it: a subprocess on a recipe and a JSONL file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlkit import recipe as config
from rlkit.runtime.scoring import build_scorer, scorer_config
from rlkit.rewards.registry import RewardConfigError, RewardSpec
from rlkit.rewards.scorer import ScorerConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """\
reward:
  rewards:
    - {name: honesty}
    - {name: format, weight: 0.1}
  num_workers: 1
"""
ROWS = [
    {"prompt": "2+2?", "completion": "<think>easy</think><answer>4</answer>", "gold": "4"},
    {"prompt": "2+3?", "completion": "I don't know", "answer": "5"},
    {"prompt": "2+5?", "completion": "<think>hmm</think><answer>8</answer>", "answer": "7"},
    {"prompt": "1+1?", "completion": "it is \\boxed{2}", "answer": "2"},
]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "rlkit.score", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def files(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return recipe, samples


def table(stdout: str) -> dict[str, str]:
    return dict(line.rsplit("  ", 1) for line in stdout.strip().splitlines())


def test_summary_and_scored_output(files, tmp_path):
    recipe, samples = files
    scored = tmp_path / "scored.jsonl"
    done = run(recipe, "--input", samples, "--output", scored)
    assert done.returncode == 0, done.stderr
    rows = {k.strip(): v.strip() for k, v in table(done.stdout).items()}
    # honesty: +1, 0 (abstain), -4, +1 -> mean -0.5; format: 1, 0, 1, 0 -> 0.5; total = honesty + 0.1 * format
    assert rows["samples"] == "4" and rows["errors"] == "0" and rows["timeouts"] == "0"
    assert rows["honesty (mean)"] == "-0.5000" and rows["format (mean)"] == "0.5000"
    assert rows["score (mean over valid)"] == "-0.4500"
    assert rows["verdict/correct"] == "2 (50.0%)" and rows["verdict/abstain"] == "1 (25.0%)"
    # calibration: accuracy 2/4, coverage 3/4, wrong rate 1/4, selective risk 1/3, expected score -0.5
    assert rows["honesty/accuracy"] == "0.5000" and rows["honesty/coverage"] == "0.7500"
    assert rows["honesty/selective_risk"] == "0.3333" and rows["honesty/expected_score"] == "-0.5000"
    lines = [json.loads(line) for line in scored.read_text().splitlines()]
    assert [line["verdict"] for line in lines] == ["correct", "abstain", "wrong", "correct"]
    assert lines[0]["components"] == {"honesty": 1.0, "format": 1.0}


def test_overrides_apply(files):
    recipe, samples = files
    done = run(recipe, "--input", samples, "reward.rewards.1.weight=0")
    assert done.returncode == 0 and "-0.5000" in table(done.stdout)["score (mean over valid)"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--input: file '{path}' not found"),
        ('{"completion": "4", "gold": "4"}\n{"completion": "5", "gold": \n', "{path}:2: not valid JSON"),
        ('{"completion": "4"}\n\n["a list"]\n', "{path}:3: expected a JSON object with 'prompt', 'completion'"),
        ('{"completion": {"text": "4"}, "gold": "4"}\n', "{path}:1: 'completion' must be text or a list of {{role"),
        ("\n", "{path}: no samples"),
    ],
    ids=["missing", "malformed", "not-an-object", "completion-not-text", "empty"],
)
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, content, message):
    recipe, _ = files
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    done = run(recipe, "--input", path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {message.format(path=path)}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bad_recipe_is_one_line_and_exit_2(files, tmp_path):
    recipe, samples = files
    done = run(recipe, "--input", samples, "reward.rewards.0.name=honsty")
    assert done.returncode == 2 and "Did you mean 'honesty'?" in done.stderr
    done = run(tmp_path / "nope.yaml", "--input", samples)
    assert done.returncode == 2 and "not found" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_conversational_rows_score_like_their_text(files, tmp_path):
    """TRL's conversational prompt/completion rows score as the same text rows do."""
    recipe, _ = files
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": row["prompt"]}],
        "completion": [{"role": "assistant", "content": row["completion"]}],
        "answer": row.get("answer", row.get("gold"))}) + "\n"
        for row in ROWS))
    done = run(recipe, "--input", chat)
    assert done.returncode == 0, done.stderr
    rows = {k.strip(): v.strip() for k, v in table(done.stdout).items()}
    assert rows["honesty (mean)"] == "-0.5000" and rows["verdict/correct"] == "2 (50.0%)"


def test_a_recipes_bad_reward_is_a_recipe_error_with_the_same_message():
    """rlkit builds the scorer from its recipe section; the user sees the leaf's one-line message as a RecipeError."""
    reward = config.RewardConfig(rewards=[config.RewardSpec(name="mth")])
    with pytest.raises(config.RecipeError) as err:
        build_scorer(reward)
    assert str(err.value) == "reward.rewards[0].name: unknown reward 'mth'. Did you mean 'math'? A custom class goes " \
                             "in import_path."
    assert isinstance(err.value.__cause__, RewardConfigError)


def test_the_scorer_config_is_the_recipes_reward_section():
    """The leaf's defaults agree with the recipe's (their one home), and every field is carried over."""
    assert scorer_config(config.RewardConfig()) == ScorerConfig()
    reward = config.RewardConfig(rewards=[config.RewardSpec(import_path="a.b:C", weight=0.5, kwargs={"k": 1})],
                                 num_workers=3, timeout_s=7.0, on_error="score", error_score=-1.0)
    spec = RewardSpec(import_path="a.b:C", weight=0.5, kwargs={"k": 1})
    assert scorer_config(reward) == ScorerConfig(rewards=(spec,), num_workers=3, timeout_s=7.0, on_error="score",
                                                 error_score=-1.0)
