"""The `model` reward (rlkit.rewards.model) on a tiny chat model's sequence classifier: it renders a prompt and a
completion exactly as a reward_model stage rendered its pairs, scores a batch as transformers does, normalises and
clips per batch, reports what it cannot score, and combines by weight in the scorer."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlkit.data.chat import Renderer, stop_token_ids
from rlkit.data.tasks import Preference, Stepwise
from rlkit.recipe import DataConfig
from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.model import ModelReward, aggregate_steps, normalize_scores
from rlkit.rewards.registry import RewardConfigError, RewardSpec, builtin_reward
from rlkit.rewards.scorer import Scorer, ScorerConfig
from rlkit.training.modeling import load_tokenizer

DATA = DataConfig(system_prompt="Be brief.", prompt_template="Q: {prompt}")


@pytest.fixture(scope="module")
def folder(chat_model_path, tmp_path_factory):
    """A random one-label sequence classifier on the chat model, with the rendering a reward_model stage records."""
    path = tmp_path_factory.mktemp("rm") / "rm"
    tok = load_tokenizer(chat_model_path)
    model = AutoModelForSequenceClassification.from_pretrained(chat_model_path, num_labels=1,
                                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    renderer = Renderer(tok, DATA, stop_token_ids(chat_model_path))
    rendering = {"kind": "outcome", "chat": renderer.chat, "system_prompt": DATA.system_prompt,
                 "prompt_template": DATA.prompt_template, "stop_ids": sorted(renderer.stop_ids), "step_separator": "\n"}
    (path / "rlkit_stage.json").write_text(json.dumps({"reward_model": rendering}))
    return path, renderer, model.eval()


def test_it_renders_prompt_and_completion_as_the_stage_rendered_its_pairs(folder):
    path, renderer, _ = folder
    reward = ModelReward(str(path))
    prompt, chosen, _ = renderer.pair(Preference("Natalia sold 48 clips. How many?", "She sold 72.", "x"))
    assert renderer.chat and reward.sequence(Sample("Natalia sold 48 clips. How many?", "She sold 72."))[0] == \
        prompt + chosen
    # a process model's steps are tokenized step by step, as the stage's stepwise examples
    ids, ends, _ = renderer.stepwise(Stepwise("Add 2 and 3.", ("2+3=5", "So 5."), (True, True)), "\n")
    reward.kind = "process"
    assert reward.sequence(Sample("Add 2 and 3.", "2+3=5\nSo 5.")) == (ids, ends)


def test_it_scores_a_batch_as_transformers_does_then_normalises_and_clips(folder):
    path, renderer, model = folder
    samples = [Sample("How many?", text) for text in ("72", "She sold 72 clips.", "I do not know")]
    raw = [model(input_ids=torch.tensor([ModelReward(str(path)).sequence(s)[0]])).logits[0, 0].item() for s in samples]
    plain = ModelReward(str(path), batch_size=2).score_batch(samples)  # two forwards, one padded
    assert [r.score for r in plain] == pytest.approx(raw, abs=1e-5)
    assert [r.verdict for r in plain] == [Verdict.CORRECT if v > 0 else Verdict.WRONG for v in raw]
    normalised = ModelReward(str(path), normalize=True, clip=1.0).score_batch(samples)
    mean, std = sum(raw) / 3, (sum((v - sum(raw) / 3) ** 2 for v in raw) / 3) ** 0.5
    assert [r.score for r in normalised] == pytest.approx([max(-1.0, min(1.0, (v - mean) / std)) for v in raw],
                                                          abs=1e-4)
    assert [r.components["raw"] for r in normalised] == pytest.approx(raw, abs=1e-5)


def test_what_it_cannot_score_is_an_error_not_a_zero(folder):
    path, _, _ = folder
    results = ModelReward(str(path)).score_batch([Sample("q", "7 " * 600), Sample("q", "7")])
    assert results[0].verdict == Verdict.ERROR and "context (512)" in results[0].info["error"]
    assert results[1].verdict != Verdict.ERROR


def test_bad_kwargs_name_the_field(folder, tmp_path):
    with pytest.raises(RewardConfigError, match=r"reward.rewards\[0\].kwargs: ModelReward: aggregate: 'max' is not"):
        builtin_reward("model", {"path": str(folder[0]), "aggregate": "max"}, "reward.rewards[0].name",
                       "reward.rewards[0].kwargs")
    with pytest.raises(RewardConfigError, match="is not a reward model folder"):
        builtin_reward("model", {"path": str(tmp_path)}, "reward.rewards[0].name", "reward.rewards[0].kwargs")


def test_the_scorer_weighs_it_like_any_reward(folder):
    path, _, _ = folder
    samples = [Sample("How many?", "72"), Sample("How many?", "I do not know")]
    alone = ModelReward(str(path)).score_batch(samples)
    with Scorer(ScorerConfig(rewards=(RewardSpec(name="model", weight=2.0, kwargs={"path": str(path)}),))) as scorer:
        out = scorer.score(samples)
    assert out.scores == pytest.approx([2 * r.score for r in alone], abs=1e-5)
    assert out.results[0].components["model"] == pytest.approx(alone[0].score, abs=1e-5)


def test_beside_gold_its_proxy_is_its_raw_score_not_the_batch_normalised_one(folder):
    # normalised per batch, a model reward's mean is 0 at every step: the gold monitor needs its own scale
    path, _, _ = folder
    samples = [Sample("How many?", "72", "72"), Sample("How many?", "I do not know", "72"), Sample("Why?", "3", "72")]
    raw = [r.score for r in ModelReward(str(path)).score_batch(samples)]
    spec = RewardSpec(name="model", weight=2.0, kwargs={"path": str(path), "normalize": True})
    with Scorer(ScorerConfig(rewards=(spec,), gold=(RewardSpec(name="math"),))) as scorer:
        out = scorer.score(samples)
    assert sum(out.scores) == pytest.approx(0.0, abs=1e-5)  # 2 x z-scores
    assert out.proxy == pytest.approx([2 * r for r in raw], abs=1e-5)
    assert [r.score for r in out.gold_results] == [1.0, 0.0, 0.0]


def test_step_aggregates_by_hand():
    probs = [0.9, 0.6, 0.8]
    assert aggregate_steps(probs, "min") == 0.6  # the weakest step
    assert aggregate_steps(probs, "product") == pytest.approx(0.432)  # 0.9 * 0.6 * 0.8: every step correct
    assert aggregate_steps(probs, "last") == 0.8
    # z-scores of [1, 2, 3]: mean 2, population std sqrt(2/3) = 0.8164966 -> -1.2247449, 0, 1.2247449; clip 1
    assert normalize_scores([1.0, 2.0, 3.0], True, 1.0) == pytest.approx([-1.0, 0.0, 1.0])
    assert normalize_scores([1.0, 2.0, 3.0], True, 0.0) == pytest.approx([-1.2247449, 0.0, 1.2247449])
    assert normalize_scores([5.0, 5.0], True, 0.0) == [0.0, 0.0]  # no spread: centred only
