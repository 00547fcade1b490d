"""Reward models (rlkit.training.reward_model): the Bradley-Terry and step losses worked by hand, and tiny models trained
a few steps on separable data that rank every held-out pair (or step) right and save folders transformers loads and
scores the same way."""

import math
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from rlkit.algorithms.reward_model import held_out_metrics, pair_batch, step_batch
from rlkit.data.chat import Renderer
from rlkit.data.tasks import Preference, Stepwise
from rlkit.recipe import DataConfig, TrainerConfig
from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.model import ModelReward
from rlkit.runtime.cluster import TrainerGroup
from rlkit.training.batches import RewardPairBatch, StepBatch
from rlkit.training.modeling import load_tokenizer
from rlkit.training.reward_model import (PairwiseLoss, RewardModelTrainer, StepLoss, bradley_terry_loss,
                                         scored_tokens, step_loss)

RENDERING = {"chat": False, "system_prompt": "", "prompt_template": "{prompt}", "stop_ids": [2], "step_separator": "\n"}


def test_bradley_terry_loss_by_hand():
    # pair 0: r_c = 2, r_r = 1, margin 0.5: -log sigmoid(2 - 1 - 0.5) = log(1 + e^-0.5) = log(1.6065307) = 0.4740770,
    #         plus centring 0.1 * (2 + 1)^2 = 0.9 -> 1.3740770
    # pair 1: r_c = -1, r_r = 1, margin 0: log(1 + e^2) = log(8.3890561) = 2.1269280, centring 0.1 * 0^2 = 0
    loss = bradley_terry_loss(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0]), 0.1)
    assert torch.allclose(loss, torch.tensor([1.3740770, 2.1269280]), atol=1e-6)


def test_pairwise_loss_is_the_step_mean_however_the_pairs_are_cut():
    # rows alternate chosen, rejected; one scored position per row: pair 0 (1, 0), pair 1 (0, 2)
    out = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    batch = RewardPairBatch(scored_tokens([[5, 6, 7]] * 4, [[1]] * 4, 0), torch.zeros(4), num_pairs=2)
    loss, stats = PairwiseLoss()(out, batch)
    # log(1 + e^-1) = 0.3132617 and log(1 + e^2) = 2.1269280, mean 1.2200948; one pair right; margins 1 and -2
    assert loss.item() == pytest.approx(1.2200948, abs=1e-6)
    assert (stats.accuracy, stats.margin) == (0.5, -0.5)
    halves = [PairwiseLoss()(out[rows], batch.select(rows)) for rows in (slice(0, 2), slice(2, 4))]
    assert sum(h[0].item() for h in halves) == pytest.approx(loss.item(), abs=1e-7)
    summed = halves[0][1] + halves[1][1]
    assert (summed.accuracy, summed.margin, summed.loss) == (0.5, -0.5, pytest.approx(stats.loss, abs=1e-7))


def test_step_loss_by_hand():
    # d = 0 for a correct step: log(1 + e^0) = log 2 = 0.6931472; d = 2 wrong: log(1 + e^2) = 2.1269280;
    # d = -1 wrong: log(1 + e^-1) = 0.3132617; the masked position counts nothing
    d, labels, mask = (torch.tensor([[0.0, 2.0, -1.0, 5.0]]), torch.tensor([[1.0, 0.0, 0.0, 1.0]]),
                       torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(step_loss(d, labels, mask), torch.tensor([[0.6931472, 2.1269280, 0.3132617, 0.0]]), atol=1e-6)
    batch = StepBatch(scored_tokens([[5, 6, 7, 8]], [[0, 1, 2]], 0), labels, normalizer=3.0)
    loss, stats = StepLoss()(d, batch)
    assert loss.item() == pytest.approx((0.6931472 + 2.1269280 + 0.3132617) / 3, abs=1e-6)
    assert stats.accuracy == pytest.approx(1 / 3)  # d > 0 says correct: wrong on the first two steps, right on d = -1


def _trainer(model_path, process, lr):
    cfg = TrainerConfig(dtype="float32", lr=lr, warmup_steps=0, micro_batch_size=16, seed=0)
    return TrainerGroup([RewardModelTrainer(cfg, model_path, lr, 0, 0, process)])


@pytest.fixture(scope="module")
def outcome(model_path, tmp_path_factory):
    """A Bradley-Terry model trained 12 steps on pairs told apart by the reply's last word ("ok" over "no")."""
    tok = load_tokenizer(model_path)
    renderer, rng = Renderer(tok, DataConfig(chat_template="none")), random.Random(0)

    def pairs(n):
        sums = [(a, b) for a, b in ((rng.randint(0, 99), rng.randint(0, 9)) for _ in range(n))]
        return [(*renderer.pair(Preference(f"{a}+{b}=", f"{a + b} ok", f"{a + b + 1} no")), 0.0) for a, b in sums]

    train, held = pairs(48), pairs(12)
    group = _trainer(model_path, process=False, lr=3e-3)
    before = held_out_metrics(group, held, renderer.pad_id, False)
    for _ in range(12):
        group.step(PairwiseLoss(), pair_batch(rng.sample(train, 16), renderer.pad_id))
    folder = tmp_path_factory.mktemp("rm") / "rm"
    group.save(str(folder), model_path, "", {"reward_model": RENDERING | {"kind": "outcome"}})
    return group, held, renderer, before, folder


def test_a_tiny_reward_model_ranks_every_held_out_pair(outcome):
    group, held, renderer, before, _ = outcome
    after = held_out_metrics(group, held, renderer.pad_id, False)
    assert after["accuracy"] == 1.0 and after["margin"] > 1.0 and after["loss"] < before["loss"]


def test_held_out_accuracy_apart_on_pairs_against_the_gold_solution(outcome):
    group, held, renderer, _, _ = outcome
    swapped = [(p, r, c, m) for p, c, r, m in held[6:]]  # every one of these is ranked the wrong way round
    split = held_out_metrics(group, held[:6] + swapped, renderer.pad_id, False, [False] * 6 + [True] * 6)
    assert (split["accuracy"], split["accuracy_sampled"], split["accuracy_gold"]) == (0.5, 1.0, 0.0)
    assert "accuracy_gold" not in held_out_metrics(group, held[:6], renderer.pad_id, False, [False] * 6)


def test_its_folder_is_a_sequence_classifier_that_scores_as_training_did(outcome):
    group, held, renderer, _, folder = outcome
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.config.pad_token_id == renderer.pad_id
    batch = pair_batch(held[:3], renderer.pad_id)
    hf = model(input_ids=batch.tokens.input_ids, attention_mask=batch.tokens.attention_mask).logits[:, 0]
    assert torch.allclose(hf, group.scores(batch.tokens).sum(-1), atol=1e-5)
    # the model reward renders text as the stage rendered its pairs, and scores the same
    reward = ModelReward(str(folder))
    prompt, chosen, _, _ = held[0]
    text_prompt, text_reply = renderer.text(prompt), renderer.text(chosen[:-1])  # without BOS / EOS
    assert reward.sequence(Sample(text_prompt[3:], text_reply))[0] == list(prompt) + list(chosen)
    results = reward.score_batch([Sample(text_prompt[3:], text_reply), Sample("3+4=", "8 no")])
    assert results[0].score == pytest.approx(hf[0].item(), abs=1e-5) and results[0].verdict == Verdict.CORRECT
    assert results[1].verdict == Verdict.WRONG and results[1].components["raw"] < 0


def test_a_tiny_process_reward_model_scores_each_step(model_path, tmp_path):
    tok = load_tokenizer(model_path)
    renderer, rng = Renderer(tok, DataConfig(chat_template="none")), random.Random(1)

    def examples(n):  # a step ending in "ok" is correct, one ending in "no" is wrong
        out = []
        for _ in range(n):
            labels = tuple(rng.random() < 0.5 for _ in range(rng.randint(1, 3)))
            steps = tuple(f"{rng.randint(0, 99)} {'ok' if v else 'no'}" for v in labels)
            out.append(renderer.stepwise(Stepwise(f"{rng.randint(0, 9)}=", steps, labels), "\n"))
        return out

    train, held = examples(48), examples(12)
    group = _trainer(model_path, process=True, lr=1e-2)
    for _ in range(12):
        group.step(StepLoss(), step_batch(rng.sample(train, 16), renderer.pad_id))
    assert held_out_metrics(group, held, renderer.pad_id, True)["accuracy"] == 1.0
    folder = tmp_path / "prm"
    group.save(str(folder), model_path, "", {"reward_model": RENDERING | {"kind": "process"}})
    assert AutoModelForTokenClassification.from_pretrained(folder).config.num_labels == 2
    good, bad, empty = Sample("1=", "1 ok\n2 ok\n"), Sample("1=", "1 ok\n2 no\n3 ok"), Sample("1=", "")
    by = {how: ModelReward(str(folder), aggregate=how).score_batch([good, bad, empty])
          for how in ("min", "product", "last")}
    assert (by["min"][2].score, by["min"][2].verdict) == (0.0, Verdict.WRONG)  # no step: the model's fault, not an error
    steps = by["min"][1].info["steps"]
    assert len(steps) == 3 and steps[0] > 0.5 > steps[1] and steps[2] > 0.5
    assert by["min"][1].score == pytest.approx(min(steps)) and by["last"][1].score == pytest.approx(steps[2])
    assert by["product"][1].score == pytest.approx(math.prod(steps))
    assert by["min"][0].verdict == Verdict.CORRECT and by["min"][1].verdict == Verdict.WRONG


def test_a_reward_model_starts_from_an_earlier_stage_or_a_folder_with_the_policys_tokenizer(model_path, tmp_path):
    """`model` names an earlier stage's policy (its checkpoint under the run folder) or a folder; a folder whose
    tokenizer is not the policy's stops the stage in one line, since the pairs are the policy's token ids."""
    import shutil

    from rlkit.algorithms.reward_model import backbone_path
    from rlkit.recipe import RecipeConfig, RecipeError, StageConfig
    from tests.chat_model import build_tokenizer

    def cfg(model):
        return RecipeConfig(stages=[StageConfig(kind="sft", name="long"), StageConfig(kind="reward_model", model=model)])

    assert backbone_path(cfg(""), 1, tmp_path, model_path) == model_path  # the policy
    long = shutil.copytree(model_path, tmp_path / "checkpoints" / "long")  # stage `long`'s checkpoint
    assert backbone_path(cfg("long"), 1, tmp_path, model_path) == str(long)
    same = shutil.copytree(model_path, tmp_path / "same")
    assert backbone_path(cfg(str(same)), 1, tmp_path, model_path) == str(same)
    other = shutil.copytree(model_path, tmp_path / "other")
    build_tokenizer().save_pretrained(other)  # a byte-level BPE instead of the character tokenizer
    with pytest.raises(RecipeError, match="stages.1.model: '.*other' has another tokenizer than the policy"):
        backbone_path(cfg(str(other)), 1, tmp_path, model_path)
