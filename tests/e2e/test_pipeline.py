"""The practitioners' stages on the embedded default, end to end: SFT with snapshots, rejection-sampling
fine-tuning, online DPO over two rounds, the average of DPO's last snapshots, and a reward model on the SFT model's
own answers (a branch back to SFT: `start`) with the averaged model's transformer (`model`) (one run of
recipes/pipeline.yaml, scaled down, with a short form of quickstart_rm.yaml's reward model stage); then distillation
from that run's model into a fresh student, and IFD data selection scored by its SFT model.
"""

import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlkit.data.tasks import make_problem
from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.math import MathReward
from rlkit.runtime.checkpoint import Checkpointer
from rlkit.select import main as select_main
from tests.e2e.test_quickstart import REPO, read_metrics, run

STAGES = (
    "stages=[{kind: sft, steps: 300, batch_size: 64, lr: 1.0e-3, save_every: 100},"
    " {kind: rft, steps: 40, batch_size: 32, samples: 8, keep: all, lr: 5.0e-4},"
    " {kind: dpo, pairs: online, rounds: 2, samples: 4, steps: 10, batch_size: 8, lr: 1.0e-4, save_every: 3},"
    " {kind: average, last: 3},"
    " {kind: reward_model, name: rm, start: 01_sft, model: 04_average, pairs: policy, samples: 4, steps: 6,"
    " batch_size: 16, lr: 1.0e-3}]"
)
COMMON = ["logging.wandb_mode=disabled", "logging.log_every=1", "data.num_eval=200"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    proc = run("recipes/pipeline.yaml", f"logging.output_dir={run_dir}", *COMMON, STAGES)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, json.loads((run_dir / "summary.json").read_text())["stages"], read_metrics(run_dir)


def last_value(metrics, key):
    return [m[key] for m in metrics if key in m][-1]


def all_judged_correct(kept: list[dict]) -> bool:
    """Whether the math reward judges every kept example correct: by its rules, not by string equality with gold
    ("00" reads as 0, R7; "T9" and "4~" answer 9 and 4, R4)."""
    math = MathReward()
    return all(math.score(Sample(row["prompt"], row["completion"], row["gold"])).verdict == Verdict.CORRECT
               for row in kept)


@pytest.mark.slow
def test_rft_trains_on_accepted_samples_and_gains(pipeline):
    run_dir, stages, metrics = pipeline
    rft = stages[1]
    assert rft["kind"] == "rft" and rft["after"]["accuracy"] > rft["before"]["accuracy"], rft
    kept = [json.loads(line) for line in (run_dir / "02_rft.examples.jsonl").read_text().splitlines()]
    assert kept and all_judged_correct(kept)
    assert any(row["completion"].strip() == row["gold"] for row in kept)
    assert len(kept) == last_value(metrics, "rft/num_examples")
    assert 0 < last_value(metrics, "rft/acceptance_rate") <= last_value(metrics, "rft/sample_accuracy")


@pytest.mark.slow
def test_online_dpo_reports_each_round(pipeline):
    _, stages, metrics = pipeline
    rounds = [(m["dpo/round/index"], m["dpo/round/accuracy"]) for m in metrics if "dpo/round/accuracy" in m]
    assert [r for r, _ in rounds] == [0, 1]
    assert all(m["dpo/round/num_pairs"] > 0 for m in metrics if "dpo/round/num_pairs" in m)
    assert rounds[-1][1] == pytest.approx(stages[2]["after"]["accuracy"])  # the last round is the stage's result


@pytest.mark.slow
def test_average_is_the_mean_of_the_last_snapshots(pipeline):
    run_dir, stages, metrics = pipeline
    ckpt = run_dir / "checkpoints"
    info = json.loads((ckpt / "04_average" / "rlkit_stage.json").read_text())
    assert info["averaged"] == ["step_000006", "step_000009", "03_dpo"]
    sources = [load_file(str(p / "model.safetensors")) for p in
               (ckpt / "03_dpo.snapshots" / "step_000006", ckpt / "03_dpo.snapshots" / "step_000009", ckpt / "03_dpo")]
    averaged = load_file(str(ckpt / "04_average" / "model.safetensors"))
    for name, value in averaged.items():
        torch.testing.assert_close(value, sum(s[name] for s in sources) / 3, rtol=1e-6, atol=1e-6)
    assert last_value(metrics, "average/last/accuracy") == pytest.approx(stages[2]["after"]["accuracy"])
    assert stages[3]["kind"] == "average" and "accuracy" in stages[3]["after"]


@pytest.mark.slow
def test_a_stage_branches_back_to_an_earlier_policy_and_a_reward_model_starts_from_another(pipeline):
    """`start: 01_sft`: the engines take the SFT checkpoint again and evaluate it as the stage's `before` (as SFT's
    own evaluation scored it), and the run continues from it; `model: 04_average`: the reward model's transformer
    starts from the averaged policy, not from the policy it samples its pairs from."""
    run_dir, stages, _ = pipeline
    sft, average, rm = stages[0]["after"], stages[3]["after"], stages[4]["before"]
    assert sft["accuracy"] != average["accuracy"]  # the branch is visible in held-out accuracy
    assert rm["accuracy"] == pytest.approx(sft["accuracy"]) and rm["mean_reward"] == pytest.approx(sft["mean_reward"])
    assert Checkpointer(run_dir, keep=1).latest().state.model_path.endswith("01_sft")  # where a next stage would start
    ckpt = run_dir / "checkpoints"
    rm_body = {k: v.float() for k, v in load_file(str(ckpt / "rm" / "model.safetensors")).items() if k != "score.weight"}

    def distance(folder):
        weights = load_file(str(ckpt / folder / "model.safetensors"))
        return sum(float((weights[k].float() - v).pow(2).sum()) for k, v in rm_body.items())

    assert distance("04_average") < distance("01_sft") / 4  # 6 steps from the average (10x nearer here), far from SFT


@pytest.mark.slow
def test_a_reward_model_on_the_policys_own_answers_scores_its_held_out_pairs_apart(pipeline):
    """`pairs: policy`: the policy's samples on the training prompts, paired wrong against right (or against the gold
    solution where no sample was right), train it; its held-out pairs, sampled on the held-out prompts, score it, on
    all pairs and apart on the pairs of two samples and on those against the gold solution."""
    run_dir, stages, metrics = pipeline
    assert stages[4]["kind"] == "reward_model" and stages[4]["after"] == stages[4]["before"]  # the policy unchanged
    held = json.loads((run_dir / "checkpoints" / "rm" / "rlkit_stage.json").read_text())["held_out"]
    final = [m for m in metrics if "rm/eval/accuracy" in m][-1]
    assert held == {k.removeprefix("rm/eval/"): v for k, v in final.items() if k.startswith("rm/eval/")}
    pairs, gold = last_value(metrics, "rm/eval/num_pairs"), last_value(metrics, "rm/eval/gold_fraction")
    assert pairs > 20 and 0 < gold < 1 and last_value(metrics, "rm/num_pairs") > 0
    # all pairs' accuracy is the two parts' accuracies weighted by their shares
    mixed = gold * held["accuracy_gold"] + (1 - gold) * held["accuracy_sampled"]
    assert held["accuracy"] == pytest.approx(mixed, abs=1e-6)


@pytest.mark.slow
def test_distill_keeps_only_teacher_answers_that_match_gold(pipeline, tmp_path):
    teacher = pipeline[0] / "checkpoints" / "04_average"
    proc = run("recipes/pipeline.yaml", f"logging.output_dir={tmp_path / 'student'}", *COMMON,
               f"stages=[{{kind: distill, teacher: '{teacher}', steps: 150, batch_size: 32, samples: 2, lr: 1.0e-3}}]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    distill = json.loads((tmp_path / "student" / "summary.json").read_text())["stages"][0]
    kept = [json.loads(line) for line in
            (tmp_path / "student" / "01_distill.examples.jsonl").read_text().splitlines()]
    metrics = read_metrics(tmp_path / "student")
    assert kept and all_judged_correct(kept)
    assert last_value(metrics, "distill/sample_accuracy") < 1.0  # some teacher answers were wrong and dropped
    assert distill["after"]["accuracy"] > distill["before"]["accuracy"] + 0.05, distill  # from a fresh student


def write_problems(path, problems):
    path.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))


def direct_loss(model, tokenizer, prompt: str, answer: str) -> float:
    """Per-token NLL of the answer's text after BOS + prompt, straight from the model's logits."""
    ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt + answer, add_special_tokens=False)
    start = 1 + len(tokenizer.encode(prompt, add_special_tokens=False))  # first answer token
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    targets = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return float(nll[start - 1:].mean())


@pytest.mark.slow
def test_select_ranks_by_ifd_with_its_guards(pipeline, tmp_path, capsys):
    """`python -m rlkit.select` on the SFT checkpoint: IFD from the model's own losses, highest first, at most
    1 (a prompt that makes its answer less likely is dropped), the loss guards, and a bad --model path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = pipeline[0] / "checkpoints" / "01_sft"
    rng = random.Random(0)
    pool = [make_problem(rng, rng.choice(["add", "mul"]), 2) for _ in range(300)]
    write_problems(tmp_path / "pool.jsonl", pool)
    out = subprocess.run([sys.executable, "-m", "rlkit.select", "--model", str(scorer), "--input",
                          str(tmp_path / "pool.jsonl"), "--output", str(tmp_path / "selected.jsonl"), "--fraction", "0.2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    chosen = [json.loads(line) for line in (tmp_path / "selected.jsonl").read_text().splitlines()]
    assert 0 < len(chosen) <= 60 and f"wrote {len(chosen)}" in out.stdout
    ifds = [row["ifd"] for row in chosen]
    assert ifds == sorted(ifds, reverse=True) and all(v <= 1.0 for v in ifds)
    model, tok = AutoModelForCausalLM.from_pretrained(scorer).eval(), AutoTokenizer.from_pretrained(scorer)
    for row in chosen[:3]:  # the batched, fused-kernel losses equal a direct computation
        conditioned = direct_loss(model, tok, row["prompt"], row["answer"])
        alone = direct_loss(model, tok, "", row["answer"])
        assert row["loss_conditioned"] == pytest.approx(conditioned, rel=1e-4)
        assert row["ifd"] == pytest.approx(conditioned / alone, rel=1e-4)
    # the guards: a scorer that finds everything noise keeps nothing, and says so (the command line ran above; these
    # call its main() in this process, which returns the exit code, instead of paying for another interpreter)
    capsys.readouterr()
    code = select_main(["--model", str(scorer), "--input", str(tmp_path / "pool.jsonl"), "--output",
                        str(tmp_path / "none.jsonl"), "--max-loss", "0.001", "--min-loss", "0"])
    out = capsys.readouterr()
    assert code == 0 and "wrote 0" in out.out and "fewer eligible" in out.err
    code = select_main(["--model", str(tmp_path), "--input", str(tmp_path / "pool.jsonl"), "--output",
                        str(tmp_path / "x.jsonl")])
    bad = capsys.readouterr()
    assert code == 2 and "--model" in bad.err and "config.json" in bad.err


@pytest.mark.slow
def test_lora_adapter_sync_serves_what_the_trainer_saves(pipeline, tmp_path):
    """LoRA stages on the SFT model with adapter-only sync: the base goes to the engines once per stage, then the
    adapter alone. A last stage of 0 steps starts from the merged checkpoint the GRPO stage saved: the engines,
    given that as their base, score what they scored with the GRPO stage's base and adapter."""
    start = pipeline[0] / "checkpoints" / "01_sft"
    proc = run("recipes/pipeline.yaml", f"model.path={start}", f"logging.output_dir={tmp_path / 'lora'}",
               "trainer.lora_rank=8", "trainer.lora_sync=adapter", "data.num_eval=100", "logging.wandb_mode=disabled",
               "logging.log_every=1", "stages=[{kind: sft, steps: 20, batch_size: 32, lr: 3.0e-3},"
               " {kind: grpo, steps: 3, batch_size: 4, lr: 1.0e-3}, {kind: sft, steps: 0}]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    sent = [m["grpo/weight_sync/megabytes"] for m in read_metrics(tmp_path / "lora") if "grpo/weight_sync/megabytes" in m]
    full_mb = sum(v.numel() * 4 for v in load_file(str(start / "model.safetensors")).values()) / 2**20
    assert len(sent) == 3 and sent[0] > full_mb  # the stage's first sync: its frozen base, then the adapter
    assert all(0 < mb < 0.2 * full_mb for mb in sent[1:])  # then the adapter alone
    _, grpo, merged = json.loads((tmp_path / "lora" / "summary.json").read_text())["stages"]
    assert merged["after"]["accuracy"] == pytest.approx(grpo["after"]["accuracy"], abs=0.011), (grpo, merged)
