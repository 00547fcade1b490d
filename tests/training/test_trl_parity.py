"""TRL as a test oracle: TRL's own advantage and loss code and rlkit's, fed identical inputs.

TRL side (the version pyproject.toml's dev extra pins): real GRPOTrainer, RLOOTrainer and DPOTrainer objects, each
built from its config and the tiny checkpoint of the `model_path` fixture (by path: TRL loads its reference model
from it). Advantages come from their `_generate_and_score_completions` (the tiny model really generates; a reward
function hands back the test's rewards, None for an unscorable sample). Losses come from their `compute_loss`,
called on a stand-in model micro-batch by micro-batch and backpropagated as transformers' `Trainer.training_step`
does (`trl_backward`). Set by hand on these real objects: `current_gradient_accumulation_steps` (the training loop
sets it), DPO's `ref_model` (a stand-in table), and GRPO's `use_vllm` in the truncated-IS test.
rlkit side: the real `ShardedTrainer.step` with `PolicyLoss` / `DPOLoss` (two micro-batches, gradient accumulation) on an
object made with `object.__new__` and `RankWorker.__init__`, so that its model is a stand-in, not a checkpoint.

The stand-in model on both sides is a float64 table of per-token log-probs (and entropies), a parameter looked
up by the row id in each sequence's first token; the tests compare the gradients the two losses put on it.
Pairs that should match are asserted equal; each difference kept by design (docs/algorithms.md) is asserted
as its documented relation, so either side drifting fails here.
"""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from rlkit.algorithms.advantages import compute_advantages, get_estimator
from rlkit.recipe import AlgoConfig, RefConfig, TrainerConfig
from rlkit.training.losses import DPOLoss, PolicyLoss, token_normalizer
from rlkit.training.trainer import LogprobModel, RankWorker, ShardedTrainer
from rlkit.training.batches import PairBatch, PolicyBatch, pack_sequences

P, C = 2, 5  # prompt tokens (row id, filler) and completion budget (TRL's max_completion_length)
LENGTHS = [5, 3, 1, 4, 2, 5, 4, 2]  # ragged completions; both micro-batches of 4 hold 13 tokens
N = len(LENGTHS)
CLOSE = dict(rtol=1e-12, atol=1e-14)  # float64: the two codes differ only in the order of a few operations


# -- the stand-in models ---------------------------------------------------------------------------------------
class RlkitTable(LogprobModel):
    """rlkit's stand-in: what LogprobModel returns (log-probs, entropies on the (B, L-1) target grid, zero off
    the response), read from tables by the row id in input_ids[:, 0]."""

    def __init__(self, logp, entropy):
        torch.nn.Module.__init__(self)  # no LM to wrap
        self.logp, self.entropy = torch.nn.Parameter(logp.clone()), torch.nn.Parameter(entropy.clone())

    def forward(self, batch, temperature=1.0, impl="auto", return_entropy=False):
        rows, mask = batch.input_ids[:, 0], batch.response_mask
        return self.logp[rows] * mask, self.entropy[rows] * mask if return_entropy else None


class TrlTable(torch.nn.Module):
    """TRL's stand-in: the fused-LM-head output TRL's trainers read (`model(..., labels, fused_lm_head=True)`),
    log-probs on the same grid, zero where the next label is -100."""

    def __init__(self, logp, entropy):
        super().__init__()
        self.logp, self.entropy = torch.nn.Parameter(logp.clone()), torch.nn.Parameter(entropy.clone())

    def forward(self, input_ids, labels, fused_lm_head=False, **kwargs):
        assert fused_lm_head
        rows, target = input_ids[:, 0], (labels[:, 1:] != -100).to(self.logp.dtype)  # (b,), (b, L-1)
        logp = self.logp[rows] * target
        return SimpleNamespace(log_probs=logp, entropy=self.entropy[rows] * target, mean_logits=torch.zeros_like(logp),
                               is_top1=torch.zeros_like(target, dtype=torch.bool), aux_loss=None)


def rlkit_trainer(micro_batch_size, model):
    """The real ShardedTrainer step around a stand-in model (built without loading a checkpoint)."""
    trainer = object.__new__(ShardedTrainer)
    cfg = TrainerConfig(micro_batch_size=micro_batch_size, grad_clip=1e12, dtype="float64")
    RankWorker.__init__(trainer, cfg, model, [], lr=0.0, warmup_steps=1, rank=0, world_size=1)
    return trainer


def trl_backward(trainer, model, micro_batches):
    """What transformers' Trainer.training_step does with each micro-batch of an accumulation window."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = len(micro_batches)
    total = 0.0
    for mb in micro_batches:
        loss = trainer.compute_loss(model, mb)
        if not trainer.loss_is_scaled_for_ga:
            loss = loss / trainer.current_gradient_accumulation_steps
        loss.backward()
        total += float(loss)
    return total


# -- GRPO losses -----------------------------------------------------------------------------------------------
def policy_inputs(seed=0):
    """(B, L-1) tables: log-probs, old (ratios off 1 on both sides of the clip), reference, engine, entropy;
    advantages of both signs; the response mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(N, P + C - 1, dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        mask[i, P - 1 : P - 1 + n] = 1.0
    noise = lambda: 0.4 * torch.randn(N, P + C - 1, generator=g, dtype=torch.float64)  # noqa: E731
    logp = -0.1 - 2.0 * torch.rand(N, P + C - 1, generator=g, dtype=torch.float64)
    entropy = torch.rand(N, P + C - 1, generator=g, dtype=torch.float64)
    return SimpleNamespace(mask=mask, logp=logp, old=(logp + noise()) * mask, ref=(logp + noise()) * mask,
                           rollout=(logp + noise()) * mask, entropy=entropy,
                           adv=torch.randn(N, generator=g, dtype=torch.float64))


def rlkit_policy_grad(x, algo, kl_coef, on_policy=False, micro_batch_size=N // 2):
    tokens = pack_sequences([[i, 5] for i in range(N)], [[7] * n for n in LENGTHS], pad_id=0)
    assert torch.equal(tokens.response_mask, x.mask.float())
    batch = PolicyBatch(tokens, x.mask, None if on_policy else x.old, x.ref, x.rollout, x.adv,
                        float(token_normalizer(x.mask, algo.loss_agg, C)))
    loss = PolicyLoss.from_config(algo, RefConfig(kl_coef=kl_coef), temperature=1.0)
    model = RlkitTable(x.logp, x.entropy)
    update = rlkit_trainer(micro_batch_size, model).step(loss, batch)  # two micro-batches by default
    return model.logp.grad, update.stats.loss


PROMPTS = Dataset.from_dict({"prompt": ["1+1="]})  # what the trainers' samplers would draw from; unused here


def given_reward(completions, reward, **kwargs):
    """A TRL reward function that hands back the test's rewards (a column of the inputs; None: unscorable)."""
    return list(reward)


def trl_grpo(model_path, tmp_path, **args):
    config = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                        per_device_train_batch_size=N // 2, gradient_accumulation_steps=2, num_generations=4,
                        max_completion_length=C, **args)
    return GRPOTrainer(model_path, reward_funcs=given_reward, args=config, train_dataset=PROMPTS)


def trl_policy_grad(trainer, x, on_policy=False, is_cap=None):
    """TRL's gradient on the log-prob table over the same two micro-batches, and its summed loss."""
    model, tail = TrlTable(x.logp, x.entropy), slice(P - 1, None)  # the completion columns of the grid
    micro_batches = []
    for rows in (slice(0, N // 2), slice(N // 2, N)):
        mb = {"prompt_ids": torch.tensor([[i, 5] for i in range(N)])[rows],
              "prompt_mask": torch.ones(N // 2, P, dtype=torch.long),
              "completion_ids": torch.full((N // 2, C), 7), "completion_mask": x.mask[rows, tail].long(),
              "advantages": x.adv[rows], "ref_per_token_logps": x.ref[rows, tail],
              "num_items_in_batch": x.mask.sum()}  # dapo/cispo: tokens of the whole generation batch
        if not on_policy:
            mb["old_per_token_logps"] = x.old[rows, tail]
        if is_cap is not None:  # `token_truncate` in _generate_and_score_completions, on the same inputs
            log_ratio = (x.old - x.rollout)[rows, tail] * x.mask[rows, tail]
            mb["importance_sampling_ratio"] = torch.exp(log_ratio).clamp(max=is_cap)
        micro_batches.append(mb)
    loss = trl_backward(trainer, model, micro_batches)
    return model.logp.grad, loss


GRPO_PAIRS = {  # TRL GRPOConfig arguments <-> rlkit AlgoConfig: pairs that must agree
    "grpo": ({"loss_type": "grpo"}, {"loss_agg": "seq-mean-token-mean"}),
    "dapo": ({"loss_type": "dapo"}, {"loss_agg": "token-mean"}),
    "dr_grpo": ({"loss_type": "dr_grpo"}, {"loss_agg": "seq-mean-token-sum-norm"}),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence"},
             {"loss_agg": "seq-mean-token-mean", "ratio_level": "sequence"}),
    # CISPO: TRL's epsilon_high is the weight's cap itself, rlkit's the range above 1
    "cispo": ({"loss_type": "cispo", "epsilon_high": 1.28}, {"loss_agg": "token-mean", "pg_loss": "cispo"}),
    "entropy_bonus": ({"loss_type": "dapo", "entropy_coef": 0.05}, {"loss_agg": "token-mean", "entropy_coef": 0.05}),
}


@pytest.mark.parametrize("name", list(GRPO_PAIRS))
@pytest.mark.parametrize("on_policy", [False, True])
def test_grpo_losses_match_trl(model_path, tmp_path, name, on_policy):
    trl_args, rlkit_args = GRPO_PAIRS[name]
    trl_args = {"beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.28, "use_bias_correction_kl": False} | trl_args
    x = policy_inputs()
    trl_grad, trl_loss = trl_policy_grad(trl_grpo(model_path, tmp_path, **trl_args), x, on_policy)
    algo = AlgoConfig(epsilon=0.2, epsilon_high=0.28, **rlkit_args)
    ours, our_loss = rlkit_policy_grad(x, algo, kl_coef=0.04, on_policy=on_policy)
    assert trl_grad.abs().sum() > 0
    torch.testing.assert_close(ours, trl_grad, **CLOSE)
    assert our_loss == pytest.approx(trl_loss, rel=1e-12)


@pytest.mark.parametrize("name", list(GRPO_PAIRS))
def test_rlkit_updates_do_not_depend_on_micro_batching(name):
    # The by-design side of "per-micro-batch normalisers": with micro-batches of 3, 3 and 2 rows TRL's grpo
    # mean and entropy bonus would weigh rows differently; rlkit's step-wide normalisers do not.
    x, algo = policy_inputs(4), AlgoConfig(epsilon=0.2, epsilon_high=0.28, **GRPO_PAIRS[name][1])
    whole = rlkit_policy_grad(x, algo, kl_coef=0.04, micro_batch_size=N)[0]
    torch.testing.assert_close(rlkit_policy_grad(x, algo, kl_coef=0.04, micro_batch_size=3)[0], whole, **CLOSE)


def test_truncated_importance_sampling_matches_trl(model_path, tmp_path):
    # GRPOConfig refuses vLLM IS without vLLM, so the trainer is built with use_vllm=False and switched on here;
    # the IS ratio is the one `_generate_and_score_completions` forms in `token_truncate` mode (trl_policy_grad).
    trainer = trl_grpo(model_path, tmp_path, loss_type="dapo", beta=0.04, use_bias_correction_kl=False,
                       vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.5)
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    x = policy_inputs(1)
    trl_grad, _ = trl_policy_grad(trainer, x, is_cap=1.5)
    ours, _ = rlkit_policy_grad(x, AlgoConfig(loss_agg="token-mean", tis_cap=1.5), kl_coef=0.04)
    torch.testing.assert_close(ours, trl_grad, **CLOSE)


def test_kl_importance_correction_is_trls_only_difference(model_path, tmp_path):
    # By design rlkit's KL term is the GRPO paper's plain k3. TRL's default use_bias_correction_kl multiplies it
    # by the ratio (DeepSeek-V3.2), whose gradient on-policy adds beta * k3 / (tokens) to each token.
    x = policy_inputs(2)
    trl_grad, _ = trl_policy_grad(trl_grpo(model_path, tmp_path, loss_type="dapo", beta=0.04), x, on_policy=True)
    ours, _ = rlkit_policy_grad(x, AlgoConfig(loss_agg="token-mean"), kl_coef=0.04, on_policy=True)
    r = x.ref - x.logp
    k3 = (torch.exp(r) - 1 - r) * x.mask
    torch.testing.assert_close(trl_grad - ours, 0.04 * k3 / x.mask.sum(), **CLOSE)


# -- advantages ------------------------------------------------------------------------------------------------
GROUPS = [[1.0, 1.0, None, 1.0],  # excluded sample in a uniform group: no signal (was [0.577, 0.577, 0, 0.577])
          [1.0, 0.0, 2.5, None],
          [0.5, None, None, 0.2],  # two valid samples
          [None, None, 0.7, None],  # one valid sample: no signal
          [3.0, 1.0, 4.0, 1.5]]


def trl_advantages(trainer, groups):
    """TRL's advantages for `groups` of rewards (None: unscorable) through its own generate-and-score step."""
    inputs = [{"prompt": f"{i}+1=", "reward": r} for i, group in enumerate(groups) for r in group]
    trainer.model.train()
    return trainer._generate_and_score_completions(inputs)["advantages"]


def rlkit_advantages(name, groups, **algo):
    rewards = torch.tensor([0.0 if r is None else r for g in groups for r in g])  # the scorer's placeholder 0
    valid = torch.tensor([r is not None for g in groups for r in g])
    return compute_advantages(get_estimator(name), rewards, valid, 4, AlgoConfig(**algo)), rewards, valid


def test_dr_grpo_advantages_match_trl_and_exclusion_leaves_the_group(model_path, tmp_path):
    trl = trl_advantages(trl_grpo(model_path, tmp_path, beta=0.0, scale_rewards="none"), GROUPS)
    ours, _, _ = rlkit_advantages("grpo", GROUPS, scale_rewards=False)
    torch.testing.assert_close(ours, trl, rtol=1e-6, atol=1e-6)
    assert ours[:4].tolist() == [0.0] * 4 and ours[12:16].tolist() == [0.0] * 4


def test_group_scaled_advantages_differ_from_trl_by_bessel(model_path, tmp_path):
    # By design: rlkit divides by the population std of a group's n valid rewards, TRL by the Bessel-corrected one;
    # the ratio is sqrt(n / (n - 1)) (up to the eps: 1e-6 here, 1e-4 in TRL).
    trl = trl_advantages(trl_grpo(model_path, tmp_path, beta=0.0, scale_rewards="group"), GROUPS)
    ours, _, valid = rlkit_advantages("grpo", GROUPS)
    n = valid.reshape(-1, 4).sum(-1).repeat_interleave(4).float()
    torch.testing.assert_close(ours, trl * torch.sqrt(n / (n - 1).clamp(min=1)), rtol=2e-3, atol=1e-6)
    assert ours.abs().sum() > 0


def test_rloo_advantages_match_trl(model_path, tmp_path):
    config = RLOOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=0.0,
                        per_device_train_batch_size=4, num_generations=4, max_completion_length=3,
                        normalize_advantages=False)
    trainer = RLOOTrainer(model_path, reward_funcs=given_reward, args=config, train_dataset=PROMPTS)
    trl = trl_advantages(trainer, GROUPS)
    ours, _, _ = rlkit_advantages("rloo", GROUPS)
    torch.testing.assert_close(ours, trl, rtol=1e-6, atol=1e-6)


def test_reinforce_pp_scales_like_the_paper_not_trls_batch_mode(model_path, tmp_path):
    # By design: REINFORCE++-baseline divides the group-centred rewards by *their* batch std (Hu et al. 2025,
    # population); TRL's scale_rewards="batch" divides them by the batch std of the raw rewards (Bessel).
    # Both times their divisor give back the same centred rewards.
    trl = trl_advantages(trl_grpo(model_path, tmp_path, beta=0.0, scale_rewards="batch"), GROUPS)
    ours, rewards, valid = rlkit_advantages("reinforce_pp", GROUPS)
    centred, _, _ = rlkit_advantages("grpo", GROUPS, scale_rewards=False)  # zero where there is no signal
    torch.testing.assert_close(ours * (centred[valid].std(unbiased=False) + 1e-6), centred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trl * (rewards[valid].std() + 1e-4), centred, rtol=1e-5, atol=1e-6)


# -- DPO -------------------------------------------------------------------------------------------------------
PAIR_LENGTHS = [(3, 5), (1, 2), (4, 4), (2, 1)]  # (chosen, rejected) response tokens of 4 pairs


def pair_inputs():
    g = torch.Generator().manual_seed(3)
    rows = 2 * len(PAIR_LENGTHS)  # row 2i: pair i's chosen response, 2i + 1: its rejected one
    mask = torch.zeros(rows, P + C - 1, dtype=torch.float64)
    for row, n in enumerate(n for pair in PAIR_LENGTHS for n in pair):
        mask[row, P - 1 : P - 1 + n] = 1.0
    logp = -0.1 - 2.0 * torch.rand(rows, P + C - 1, generator=g, dtype=torch.float64)
    ref = (logp + 0.3 * torch.randn(rows, P + C - 1, generator=g, dtype=torch.float64)) * mask
    return SimpleNamespace(mask=mask, logp=logp, ref=ref)


def rlkit_dpo_grad(x, **algo):
    tokens = pack_sequences([[row, 5] for row in range(len(x.mask))], [[7] * int(n) for n in x.mask.sum(-1)], pad_id=0)
    model = RlkitTable(x.logp, torch.zeros_like(x.logp))
    loss = DPOLoss.from_config(AlgoConfig(dpo_beta=0.1, **algo))
    batch = PairBatch(tokens, x.ref.sum(-1), len(PAIR_LENGTHS))
    update = rlkit_trainer(4, model).step(loss, batch)  # two micro-batches of two pairs
    return model.logp.grad, update.stats.loss


def trl_dpo_grad(model_path, tmp_path, x, loss_type, loss_weights=None):
    config = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=0.1,
                       loss_type=loss_type, loss_weights=loss_weights, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2)
    data = Dataset.from_dict({"prompt": ["1+1="], "chosen": ["2"], "rejected": ["3"]})
    trainer = DPOTrainer(model_path, args=config, train_dataset=data)
    trainer.ref_model = TrlTable(x.ref, torch.zeros_like(x.ref))  # the frozen reference's log-probs
    policy = TrlTable(x.logp, torch.zeros_like(x.logp))
    micro_batches = []
    for pairs in ([0, 1], [2, 3]):  # TRL's rows: the chosen responses, then the rejected ones
        rows = torch.tensor([2 * i for i in pairs] + [2 * i + 1 for i in pairs])
        completion = torch.cat([torch.zeros(len(rows), 1), x.mask[rows]], dim=1).long()  # (b, L) unshifted
        micro_batches.append({"input_ids": torch.cat([rows[:, None], torch.full((len(rows), P + C - 1), 7)], 1),
                              "attention_mask": torch.ones_like(completion), "completion_mask": completion})
    loss = trl_backward(trainer, policy, micro_batches)
    return policy.logp.grad, loss


@pytest.mark.parametrize("trl_loss, algo", [
    (["sigmoid"], {"dpo_loss": "sigmoid"}),
    (["ipo"], {"dpo_loss": "ipo"}),  # length-normalised by default, as TRL and the IPO authors
    (["sigmoid_norm"], {"dpo_loss": "sigmoid", "dpo_length_normalize": True}),
])
def test_dpo_losses_match_trl(model_path, tmp_path, trl_loss, algo):
    x = pair_inputs()
    trl_grad, trl_loss_value = trl_dpo_grad(model_path, tmp_path, x, trl_loss)
    ours, our_loss = rlkit_dpo_grad(x, **algo)
    assert trl_grad.abs().sum() > 0
    torch.testing.assert_close(ours, trl_grad, **CLOSE)
    assert our_loss == pytest.approx(trl_loss_value, rel=1e-12)


def test_dpo_nll_term_is_a_per_sequence_mean_where_trl_takes_a_token_mean(model_path, tmp_path):
    # By design (rlkit: each chosen answer weighs the same, as the RPO paper's per-example NLL; TRL's "sft" term:
    # a token mean over a micro-batch's chosen tokens, then averaged over micro-batches): the NLL part's gradient
    # on a chosen token of pair i is -a / (pairs * len_i) in rlkit and -a / (micro-batches * chosen tokens of
    # its micro-batch) in TRL.
    x, a = pair_inputs(), 0.5
    with_nll = trl_dpo_grad(model_path, tmp_path, x, ["sigmoid", "sft"], [1.0, a])[0]
    trl_nll = with_nll - trl_dpo_grad(model_path, tmp_path, x, ["sigmoid"])[0]
    ours = rlkit_dpo_grad(x, dpo_nll_coef=a)[0] - rlkit_dpo_grad(x)[0]
    chosen = x.mask[0::2]  # (pairs, L-1)
    lengths = chosen.sum(-1, keepdim=True)
    mb_tokens = torch.tensor([[lengths[:2].sum()], [lengths[:2].sum()], [lengths[2:].sum()], [lengths[2:].sum()]])
    torch.testing.assert_close(ours[0::2], -a * chosen / (4 * lengths), **CLOSE)
    torch.testing.assert_close(trl_nll[0::2], -a * chosen / (2 * mb_tokens), **CLOSE)
    assert ours[1::2].abs().max() < 1e-15 and trl_nll[1::2].abs().max() < 1e-15
