"""One record per stage kind (rlkit.recipe.stage_kinds.STAGE_KINDS): its train loads as a function of the algorithms
layer, its data and flags are what the runner and data preparation used to test kinds by name for, and loading a
recipe loads none of it (no torch)."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlkit.recipe import StageConfig
from rlkit.recipe.stage_kinds import STAGE_KINDS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", sorted(STAGE_KINDS))
def test_every_kind_trains_through_a_function_of_the_algorithms_layer(kind):
    record = STAGE_KINDS[kind]
    train = record.load_train()
    assert callable(train) and train.__module__.startswith("rlkit.algorithms.")
    # a kind that trains a model gets the context; one that does not also gets the resolved recipe to save beside
    assert len(inspect.signature(train).parameters) == (1 if record.trains_model else 2)


def test_the_records_say_what_each_kind_is():
    assert {k for k, s in STAGE_KINDS.items() if s.syncs_every_step} == {"grpo", "ppo"}
    assert {k for k, s in STAGE_KINDS.items() if s.uses_advantage_estimator} == {"grpo"}
    assert {k for k, s in STAGE_KINDS.items() if not s.trains_model} == {"average", "reward_model"}
    assert {k for k, s in STAGE_KINDS.items() if not s.yields_policy} == {"reward_model"}
    data = {k: s.data(StageConfig(kind=k)) for k, s in STAGE_KINDS.items()}
    assert data == {"sft": "examples", "dpo": "problems", "grpo": "problems", "ppo": "problems", "rft": "problems",
                    "distill": "problems", "average": "", "reward_model": "problems"}
    assert STAGE_KINDS["dpo"].data(StageConfig(kind="dpo", pairs="dataset")) == "pairs"
    assert STAGE_KINDS["reward_model"].data(StageConfig(kind="reward_model", pairs="dataset")) == "pairs"
    stepwise = StageConfig(kind="reward_model", pairs="dataset", data={"format": "stepwise"})
    assert STAGE_KINDS["reward_model"].data(stepwise) == "steps"


PROBE = """
import json, sys
from rlkit.recipe import load_recipe
for path in sys.argv[1:]:
    load_recipe(path)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "ray", "vllm")
                        or (m.startswith("rlkit.") and m.split(".")[1] != "recipe"))))
"""


def test_loading_a_recipe_needs_no_torch():
    recipes = [str(ROOT / "recipes" / f"{name}.yaml") for name in ("quickstart", "pipeline", "quickstart_tools")]
    done = subprocess.run([sys.executable, "-c", PROBE, *recipes], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_a_stage_names_an_earlier_policy_by_its_name_or_folder():
    """`start` (and a reward model's `model`) name an earlier stage that trains the policy, or the run's start; a
    reward model stage, a later stage or the stage itself are no policy to start from."""
    from rlkit.recipe.stage_kinds import earlier_policy

    stages = [StageConfig(kind="sft", name="warm"), StageConfig(kind="reward_model", name="rm"),
              StageConfig(kind="dpo"), StageConfig(kind="grpo")]
    assert [earlier_policy(stages, 3, name) for name in ("warm", "01_sft", "03_dpo", "00_init")] == \
        ["warm", None, "03_dpo", "00_init"]  # a named stage's folder is its name
    assert [earlier_policy(stages, 3, name) for name in ("rm", "04_grpo", "")] == [None, None, None]
    assert earlier_policy(stages, 2, "03_dpo") is None  # not before itself
