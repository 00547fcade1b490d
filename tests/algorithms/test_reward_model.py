"""The reward_model stage (rlkit.algorithms.reward_model.train) on a preference file, through the real data preparation,
stage context, in-process cluster and step loop (no engines: the stage samples nothing with pairs: dataset): held-out
pairs split off its data, pairwise accuracy logged at every evaluation, and a checkpoint that records how it
rendered its pairs; `contrast` pairs a policy's own samples."""

import json
import random

import pytest

from rlkit.algorithms import reward_model
from rlkit.algorithms.common import StageContext, Workers
from rlkit.data.prepare import prepare_run_data
from rlkit.recipe import load_recipe
from rlkit.runtime.cluster import Cluster
from rlkit.runtime.tracking import RunLogger
from rlkit.training.modeling import load_tokenizer


@pytest.fixture()
def prefs(tmp_path):
    rng, path = random.Random(0), tmp_path / "prefs.jsonl"
    rows = []
    for _ in range(40):  # told apart by the reply's last word; margins from TRL's optional column
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "chosen": f"{a + b} ok", "rejected": f"{a + b + 1} no", "margin": 0.25})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_reward_model_stage_on_a_preference_file(model_path, prefs, tmp_path):
    cfg = load_recipe(None, [
        f"logging.output_dir={tmp_path / 'run'}", "logging.wandb_mode=disabled", "logging.eval_every=4",
        "logging.log_every=4", "trainer.dtype=float32", "trainer.micro_batch_size=16", "trainer.warmup_steps=0",
        "data.num_eval=16", f"stages=[{{kind: reward_model, name: rm, pairs: dataset, steps: 8, batch_size: 8, "
        f"lr: 3.0e-3, data: {{source: '{prefs}', num_eval: 8, chat_template: none}}}}]"])
    data = prepare_run_data(cfg, load_tokenizer(model_path))
    stage_data = data.stages[0]
    assert (len(stage_data.pairs), len(stage_data.held_out.pairs)) == (32, 8) and set(stage_data.margins) == {0.25}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = RunLogger(cfg.logging, run_dir, {})
    ctx = StageContext(cfg, cfg.stages[0], 0, model_path, stage_data,
                       Workers(None, None, None, Cluster(cfg), cfg.trainer), logger)
    folder = reward_model.train(ctx, "")
    logger.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r["rm/eval/accuracy"] for r in records if "rm/eval/accuracy" in r]
    assert len(evaluations) == 2 and evaluations[-1] == 1.0  # after step 4 and at the end
    saved = json.loads((run_dir / "checkpoints" / "rm" / "rlkit_stage.json").read_text())
    assert folder == str(run_dir / "checkpoints" / "rm") and saved["held_out"]["accuracy"] == 1.0
    assert saved["reward_model"] | {"stop_ids": []} == {"kind": "outcome", "chat": False, "system_prompt": "",
                                                        "prompt_template": "{prompt}", "stop_ids": [],
                                                        "step_separator": "\n"}
