"""The LLM judge reward: parsing and voting by hand, the scorer's batched path on a stand-in engine, and a real
judge trained by recipes/judge.yaml and served by vLLM."""

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlkit import recipe as config
from rlkit.recipe import ModelConfig, RecipeError, load_recipe
from rlkit.data.tasks import make_problem, plausible_wrong
from rlkit.training.modeling import init_model, save_checkpoint
from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.judge import DEFAULT_TEMPLATE, JudgeReward, judge_prompt, parse_vote, tally_votes
from rlkit.rewards.registry import RewardConfigError, RewardSpec
from rlkit.rewards.scorer import RewardError, Scorer, ScorerConfig
from rlkit.rollout import EngineConfig
from tests.e2e.test_quickstart import FLOAT32

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text, vote",
    [
        ("<score>1</score>", 1),
        ("<score>0</score>", 0),
        ("reasoning first... <score> 1 </score>\n", 1),  # whitespace inside the tag is fine
        ("<score>1</score> and again <score>1</score>", 1),  # repeated, agreeing
        ("<score>1</score><score>0</score>", None),  # says both: no vote
        ("<score>yes</score>", None),
        ("<score>2</score>", None),
        ("<score>0.5</score>", None),
        ("<score></score>", None),
        ("<score>1", None),  # unclosed
        ("score: 1", None),  # no tag
        ("", None),
        ("<SCORE>1</SCORE>", None),  # the tag is fixed, case included
    ],
)
def test_parse_vote(text, vote):
    assert parse_vote(text) == vote


@pytest.mark.parametrize(
    "votes, verdict, mean",
    [
        ([1, 1, 1], Verdict.CORRECT, 1.0),
        ([1, 0, 1], Verdict.CORRECT, 2 / 3),  # 2 of 3
        ([0, 0, 1], Verdict.WRONG, 1 / 3),
        ([1, 0], Verdict.WRONG, 0.5),  # a tie is not a majority
        ([1, None, 0], Verdict.WRONG, 0.5),  # a tie among the parseable votes
        ([1, None, None], Verdict.CORRECT, 1.0),  # the only parseable vote decides
        ([None, None, None], Verdict.ERROR, None),  # nothing to count: a fault, not a 0
        ([], Verdict.ERROR, None),
    ],
)
def test_tally_votes(votes, verdict, mean):
    got_verdict, got_mean = tally_votes(votes)
    assert got_verdict == verdict
    assert got_mean == (pytest.approx(mean) if mean is not None else None)


def test_prompt_template():
    assert judge_prompt("Q {prompt} A {completion} G {gold}", "1+1=", "2", None) == "Q 1+1= A 2 G "
    # braces in a completion are data, not template fields
    assert judge_prompt(DEFAULT_TEMPLATE, "x=", "{gold}", "3").endswith("Answer: {gold}\nReference: 3\nCorrect? ")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model, tok = init_model(ModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=1))
    return str(save_checkpoint(model, tok, tmp_path_factory.mktemp("judge") / "ckpt", ""))


class ScriptedEngine:
    """A stand-in engine: each prompt's K outputs from `script(prompt_text)`; records its calls."""

    def __init__(self, script, tokenizer):
        self.script, self.tok, self.calls, self.closed = script, tokenizer, [], False

    def generate(self, prompt_ids, n, temperature, seed=None):
        self.calls.append((len(prompt_ids), n, temperature, seed))
        texts = [self.tok.decode(ids, skip_special_tokens=True) for ids in prompt_ids]
        return [[SimpleNamespace(text=t) for t in self.script(text)[:n]] for text in texts]

    def close(self):
        self.closed = True


def by_answer(text: str) -> list[str]:
    """Votes 1 when the completion equals the reference, garbage for 'junk', a 1-1 split for 'tie'."""
    answer = text.split("Answer: ")[1].split("\n")[0]
    gold = text.split("Reference: ")[1].split("\n")[0]
    if answer == "junk":
        return ["no tag", "<score>maybe</score>", ""]
    if answer == "tie":
        return ["<score>1</score>", "<score>0</score>", "???"]
    return [f"<score>{int(answer == gold)}</score>", f"<score>{int(answer == gold)}</score>", "<score>0</score>"]


def make_scorer(tiny_model, make_engine, on_error="exclude", extra=()):
    specs = [RewardSpec(name="judge", kwargs={"model_path": tiny_model, "votes": 3}), *extra]
    return Scorer(ScorerConfig(rewards=specs, on_error=on_error, num_workers=1), make_engine=make_engine)


def test_scorer_runs_the_judge_once_per_batch_beside_pooled_rewards(tiny_model):
    engines = []

    def make_engine(cfg, model_path, max_model_len, seed):
        assert cfg == EngineConfig(temperature=1.0, max_new_tokens=32, kv_cache_gib=1.0)  # the judge's own engine
        assert model_path == tiny_model and max_model_len == 64 and seed == 0
        from transformers import AutoTokenizer

        engines.append(ScriptedEngine(by_answer, AutoTokenizer.from_pretrained(model_path)))
        return engines[-1]

    samples = [Sample("2+2=", c, "4") for c in ("4", "5", "junk", "tie")]
    with make_scorer(tiny_model, make_engine, extra=[RewardSpec(name="math", weight=0.5)]) as scorer:
        out = scorer.score(samples)
        engine = engines[0]
        assert engine.calls == [(4, 3, 1.0, None)]  # one generate call for the batch, K=3 samples per prompt
    assert engine.closed
    verdicts = [r.verdict for r in out.results]
    assert verdicts == [Verdict.CORRECT, Verdict.WRONG, Verdict.ERROR, Verdict.WRONG]
    # "4": judge 1 + 0.5 * math 1; "5": both 0; "junk" excluded; "tie": judge 0 (tie), math 0
    assert out.scores == [1.5, 0.0, 0.0, 0.0] and out.valid == [True, True, False, True]
    assert out.results[0].components == {"judge": 1.0, "math": 1.0}
    judge_info = [r.info["judge"] for r in out.results]
    assert judge_info[0]["votes"] == [1, 1, 0] and judge_info[0]["vote_mean"] == pytest.approx(2 / 3)
    assert judge_info[3]["votes"] == [1, 0, None] and judge_info[3]["vote_mean"] == 0.5
    assert "no parseable <score>0|1</score> tag in 3 judge outputs" in judge_info[2]["error"]
    assert out.stats["errors"] == 1 and out.stats["excluded"] == 1
    assert out.stats["judge/mean"] == pytest.approx(1 / 3)  # over the 3 samples the judge could grade


class BrokenEngine:
    def generate(self, prompt_ids, n, temperature, seed=None):
        raise RuntimeError("engine core died")

    def close(self):
        pass


def test_an_engine_failure_is_an_error_on_every_sample_not_a_zero(tiny_model):
    with make_scorer(tiny_model, lambda *args: BrokenEngine()) as scorer:
        out = scorer.score([Sample("2+2=", "4", "4"), Sample("1+1=", "3", "2")])
    assert [r.verdict for r in out.results] == [Verdict.ERROR, Verdict.ERROR]
    assert "judge engine failed: RuntimeError: engine core died" in out.results[0].info["judge"]["error"]
    assert out.valid == [False, False] and out.stats["errors"] == 2
    with make_scorer(tiny_model, lambda *args: BrokenEngine(), on_error="fail") as scorer:
        with pytest.raises(RewardError, match="reward 'judge' gave error on sample 0"):
            scorer.score([Sample("2+2=", "4", "4")])


def test_a_prompt_too_long_for_the_judge_faults_alone(tiny_model):
    from transformers import AutoTokenizer

    engine = ScriptedEngine(by_answer, AutoTokenizer.from_pretrained(tiny_model))
    judge = JudgeReward(tiny_model, votes=3)
    results = judge.score_batch([Sample("2+2=", "4", "4"), Sample("2+2=", "4" * 100, "4")], engine)
    assert results[0].verdict == Verdict.CORRECT
    assert results[1].verdict == Verdict.ERROR and "does not fit max_model_len=64" in results[1].info["error"]
    assert engine.calls[0][0] == 1  # only the prompt that fits reached the engine


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_path": "/no/such/judge"},
         "reward.rewards[0].kwargs: JudgeReward: model_path: '/no/such/judge' is not a folder"),
        ({"votes": 0}, "votes and max_new_tokens: must be >= 1"),
        ({"votes": 3, "temperature": 0.0}, "temperature: 0.0 with votes=3"),
        ({"template": "{prompt} {answer}"}, "template: cannot be formatted"),
        ({"template": "{prompt} {gold}"}, "template: must contain {completion}"),
        ({"model_pth": "x"}, "reward.rewards[0].name: bad kwargs for JudgeReward"),
    ],
)
def test_bad_judge_kwargs_fail_at_construction(tiny_model, kwargs, message):
    kwargs = {"model_path": tiny_model, **kwargs} if "model_pth" not in kwargs else kwargs
    with pytest.raises(RewardConfigError) as err:
        Scorer(ScorerConfig(rewards=[RewardSpec(name="judge", kwargs=kwargs)]), make_engine=lambda *a: BrokenEngine())
    assert message in str(err.value)


def test_verification_data_fields_are_checked():
    cfg = load_recipe(REPO / "recipes" / "judge.yaml")
    assert cfg.data.verification and cfg.stages[0].kind == "sft"
    with pytest.raises(RecipeError, match="data.verification_wrong_rate"):
        load_recipe(REPO / "recipes" / "judge.yaml", ["data.verification_wrong_rate=1.0"])
    with pytest.raises(RecipeError, match="data.verification: judge examples are built from the synthetic tasks"):
        load_recipe(REPO / "recipes" / "judge.yaml", [f"data.source={REPO / 'recipes' / 'judge.yaml'}"])


def known_samples(n: int, seed: int) -> tuple[list[Sample], list[bool]]:
    """n fresh arithmetic samples, half with the right answer and half with a plausible wrong one."""
    rng, samples, truth = random.Random(seed), [], []
    for i in range(n):
        p = make_problem(rng, rng.choice(["add", "mul"]), 2)
        correct = i % 2 == 0
        samples.append(Sample(p.prompt, p.answer if correct else plausible_wrong(p.answer, rng), p.answer))
        truth.append(correct)
    return samples, truth


@pytest.mark.slow
def test_a_trained_judge_agrees_with_the_gold_verdict(tmp_path):
    run_dir = tmp_path / "judge"
    proc = subprocess.run(
        [sys.executable, "-m", "rlkit.run", "recipes/judge.yaml", f"logging.output_dir={run_dir}",
         "logging.wandb_mode=disabled", "data.num_eval=20", *FLOAT32],  # its own evaluation is only printed
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    model_path = str(run_dir / "checkpoints" / "01_sft")
    samples, truth = known_samples(200, seed=7)
    samples.append(Sample("2+2=", "4" * 200, "4"))  # a real engine failure: the prompt does not fit
    spec = RewardSpec(name="judge", kwargs={"model_path": model_path, "votes": 3})
    with Scorer(ScorerConfig(rewards=[spec], on_error="exclude")) as scorer:
        out = scorer.score(samples)
    verdicts = [r.verdict for r in out.results]
    assert verdicts[-1] == Verdict.ERROR and out.valid[-1] is False
    agree = sum((v == Verdict.CORRECT) == t for v, t in zip(verdicts, truth)) / len(truth)
    print(f"judge agreement with the gold verdict: {agree:.2f}; held-out accuracy "
          f"{json.loads((run_dir / 'summary.json').read_text())['stages'][0]['after']['accuracy']:.2f}")
    # Measured: 0.63 agreement (0.63 held-out) after the recipe's 300 SFT steps at lr 5e-4 (0.64 and 0.68 at 1e-3,
    # until float-level changes moved a late loss spike into that run); above chance (0.5), short of a strong judge. More steps should raise it (not measured here: the budget of this test is the recipe's run).
    assert agree >= 0.58, agree
    assert sum(v == Verdict.ERROR for v in verdicts[:-1]) <= 5  # the trained judge keeps to its tag


@pytest.mark.slow
def test_the_judge_engine_runs_as_its_own_ray_actor(tmp_path):
    """On the Ray backend the scorer is an actor and the judge's vLLM engine another one it creates. An untrained
    judge writes no tag: every sample comes back an error carrying the judge's own outputs, never a 0."""
    import dataclasses

    from rlkit.runtime.cluster import Cluster
    from rlkit.recipe import ClusterConfig, RecipeConfig

    model, tok = init_model(ModelConfig(num_layers=2, max_seq_len=96))  # vLLM's CPU attention wants head_dim >= 32
    path = str(save_checkpoint(model, tok, tmp_path / "judge", ""))
    spec = config.RewardSpec(name="judge", kwargs={"model_path": path, "votes": 2, "max_new_tokens": 8})
    cfg = dataclasses.replace(RecipeConfig(), reward=config.RewardConfig(rewards=[spec], on_error="exclude"),
                              cluster=ClusterConfig(backend="ray"))
    cluster = Cluster(cfg)
    try:
        scorer = cluster.scorer()
        out = scorer.score([Sample("2+2=", "4", "4"), Sample("3*3=", "8", "9")])
        scorer.close()
    finally:
        cluster.shutdown()
    assert [r.verdict for r in out.results] == [Verdict.ERROR, Verdict.ERROR] and out.valid == [False, False]
    for result in out.results:
        info = result.info["judge"]  # the scorer keeps each reward's info under its label
        assert "no parseable" in info["error"] and len(info["outputs"]) == 2
