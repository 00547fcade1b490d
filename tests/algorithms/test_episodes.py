"""The multi-turn loop (rlkit.algorithms.episodes) on a scripted engine: token-in/token-out, masks, batching, limits and
errors; then once on a real vLLM engine: the engine's log-probs of every sampled token equal the trainer model's on
the whole episode, so the ids the trainer sees are the ids sampled."""

from dataclasses import dataclass

import pytest

from rlkit.envs.base import Environment, StepResult
from rlkit.envs.tools import Calculator, ToolEnv, format_tool_call
from rlkit.data.chat import Renderer
from rlkit.recipe import DataConfig, EnvConfig, RecipeError
from rlkit.data.tasks import Problem, tool_trace
from rlkit.algorithms.episodes import episode_metrics, make_env_factory, run_episodes
from rlkit.training.modeling import build_char_tokenizer
from tests.chat_model import build_tokenizer

CALL = format_tool_call("calculator", {"expression": "37*58"})


@dataclass(frozen=True)
class Completion:  # what an engine returns (rlkit.rollout.vllm_engine.Completion)
    token_ids: tuple
    logprobs: tuple
    text: str
    finished: bool


class ScriptedPool:
    """A test double of RolloutPool: answers each context by `reply(context text) -> (text, ids or None)` and
    records every call. Log-probs are -(1 + position in the turn) / 10, so each sampled token's is known."""

    def __init__(self, tok, reply):
        self.tok, self.reply, self.calls = tok, reply, []

    def generate(self, prompt_ids, n=1, temperature=None, max_new_tokens=None, seed=None):
        self.calls.append({"prompts": [list(p) for p in prompt_ids], "n": n, "max_new_tokens": max_new_tokens})
        out = []
        for p in prompt_ids:
            group = []
            for j in range(n):
                text, ids = self.reply(self.tok.decode(p, skip_special_tokens=False), j)
                ids = ids or self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
                if len(ids) > max_new_tokens:  # cut, as an engine cuts: the text is what was sampled
                    ids = ids[:max_new_tokens]
                    text = self.tok.decode(ids, skip_special_tokens=True)
                group.append(Completion(tuple(ids), tuple(-(k + 1) / 10 for k in range(len(ids))), text,
                                        ids[-1] == self.tok.eos_token_id))
            out.append(group)
        return out


def tool_then_answer(context, j):
    """Call the calculator first, then answer with the tool's number."""
    if "<tool_response>" not in context and "tool\n" not in context:
        return CALL, None
    return context.rsplit("response>", 2)[-2].split("<")[0] if "<tool_response>" in context else "2146", None


def plain():
    tok = build_char_tokenizer()
    renderer = Renderer(tok, DataConfig(chat_template="none"))
    problem = Problem("37*58=", "2146", "2146", "mul_hard")
    return tok, renderer, Problem(**{**problem.__dict__, "prompt_ids": tuple(renderer.prompt_ids(problem))})


def tools():
    env = ToolEnv({"calculator": Calculator()})
    return lambda: env


def test_plain_episode_ids_masks_and_logprobs_by_hand():
    tok, renderer, problem = plain()
    pool = ScriptedPool(tok, tool_then_answer)
    [[ep]] = run_episodes(pool, renderer, tools(), [problem], 1, 1.0, 0, max_turns=3, max_episode_tokens=130)
    call = tok(CALL, add_special_tokens=False).input_ids + [tok.eos_token_id]  # 83 characters (11 + 60 + 12) + EOS
    env = tok("\n<tool_response>2146</tool_response>\n", add_special_tokens=False).input_ids  # 1 + 15 + 4 + 16 + 1
    answer = tok("2146", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ep.token_ids == tuple(call + env + answer)
    assert ep.loss_mask == (1,) * 84 + (0,) * 37 + (1,) * 5
    assert ep.logprobs == tuple(-(k + 1) / 10 for k in range(84)) + (0.0,) * 37 + (-0.1, -0.2, -0.3, -0.4, -0.5)
    assert (ep.text, ep.finished, ep.turns, ep.tool_calls, ep.tool_errors) == ("2146", True, 2, 1, 0)
    # the second turn's prompt is the first turn's ids as sampled, then the environment's
    assert pool.calls[1]["prompts"] == [list(problem.prompt_ids) + call + env]
    assert ep.transcript == CALL + "</s>\n<tool_response>2146</tool_response>\n2146</s>"


def test_the_sft_trace_has_the_ids_of_the_episode_it_teaches():
    tok, renderer, problem = plain()
    [[ep]] = run_episodes(ScriptedPool(tok, tool_then_answer), renderer, tools(), [problem], 1, 1.0, 0, 3, 130)
    ids, mask = renderer.episode_example(problem, tool_trace(problem))
    assert ids == list(problem.prompt_ids) + list(ep.token_ids)
    assert mask == [0] * len(problem.prompt_ids) + list(ep.loss_mask)


def test_chat_template_sampled_ids_are_never_retokenized():
    tok = build_tokenizer()  # byte-level BPE with ChatML; "2146" has a canonical split the engine need not follow
    renderer = Renderer(tok, DataConfig())
    problem = Problem("What is 37*58?", "2146", "2146")
    problem = Problem(**{**problem.__dict__, "prompt_ids": tuple(renderer.prompt_ids(problem))})
    end = tok.convert_tokens_to_ids("<|im_end|>")
    odd = [i for ch in "2146" for i in tok(ch, add_special_tokens=False).input_ids] + [end]  # one token per digit

    def reply(context, j):
        return (CALL, None) if "<|im_start|>tool" not in context else ("2146", odd)

    pool = ScriptedPool(tok, reply)
    [[ep]] = run_episodes(pool, renderer, tools(), [problem], 1, 1.0, 0, max_turns=2, max_episode_tokens=200)
    call = tok(CALL, add_special_tokens=False).input_ids + [end]
    env = tok("\n<|im_start|>tool\n2146<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert ep.token_ids == tuple(call + env + odd) and ep.finished
    assert pool.calls[1]["prompts"] == [list(problem.prompt_ids) + call + env]
    # the chat renderer's SFT example of the same episode matches it too (here up to the answer's split)
    ids, mask = renderer.episode_example(problem, tool_trace(Problem("37*58=", "2146", "2146")))
    assert ids[: len(problem.prompt_ids) + len(call) + len(env)] == list(problem.prompt_ids) + call + env


def test_identical_contexts_share_one_prompt_with_n_samples_and_calls_are_batched():
    tok, renderer, problem = plain()
    other = Problem("12*34=", "408", "408", prompt_ids=tuple(renderer.prompt_ids(Problem("12*34=", "", ""))))

    def reply(context, j):  # turn 1: sample 0 calls with a broken expression, the others call correctly
        if "<tool_response>" in context:
            return "1", None
        return (CALL.replace("37*58", "37*") if j == 0 else CALL), None

    pool = ScriptedPool(tok, reply)
    groups = run_episodes(pool, renderer, tools(), [problem, other], 3, 1.0, 0, max_turns=2, max_episode_tokens=200)
    assert [len(g) for g in groups] == [3, 3]
    assert [(c["n"], len(c["prompts"])) for c in pool.calls] == [(3, 2), (1, 2), (2, 2)]  # turn 2: by count
    broken = groups[0][0]
    assert broken.tool_errors == 1 and "error: not an arithmetic expression" in broken.transcript
    metrics = episode_metrics(groups)
    assert metrics["episode/turns"] == 2.0 and metrics["episode/tool_calls"] == 1.0
    assert metrics["episode/tool_error_rate"] == pytest.approx(2 / 6)  # sample 0 of each problem


def test_limits_end_episodes_unfinished():
    tok, renderer, problem = plain()
    always_call = ScriptedPool(tok, lambda context, j: (CALL, None))
    [[ep]] = run_episodes(always_call, renderer, tools(), [problem], 1, 1.0, 0, max_turns=2, max_episode_tokens=400)
    assert (ep.turns, ep.finished, ep.tool_calls) == (2, False, 2)  # out of turns: no environment ids after it
    assert ep.loss_mask[-1] == 1
    # budget: 84 call ids + 37 environment ids = 121; at 100 the tool's reply does not fit, at 123 the answer is cut
    [[short]] = run_episodes(ScriptedPool(tok, tool_then_answer), renderer, tools(), [problem], 1, 1.0, 0, 3, 100)
    assert (len(short.token_ids), short.turns, short.finished) == (84, 1, False)
    pool = ScriptedPool(tok, tool_then_answer)
    [[cut]] = run_episodes(pool, renderer, tools(), [problem], 1, 1.0, 0, 3, 123, max_new_tokens=90)
    assert (len(cut.token_ids), cut.text, cut.finished) == (123, "21", False)
    assert [c["max_new_tokens"] for c in pool.calls] == [90, 2]  # each turn capped by the room left


class Opener(Environment):
    """Opens with its own turns and nudges once: reset and non-tool messages."""

    def reset(self, problem):
        return [{"role": "user", "content": "Q: " + problem.prompt}]

    def step(self, message):
        return StepResult([{"role": "user", "content": "sure?"}], {"nudge": 0.5}, done=message == "yes")


def test_an_environment_may_open_the_episode_and_add_reward_parts():
    tok, renderer, problem = plain()
    pool = ScriptedPool(tok, lambda context, j: ("yes" if "sure?" in context else "no", None))
    [[ep]] = run_episodes(pool, renderer, Opener, [problem], 1, 1.0, 0, max_turns=3, max_episode_tokens=40)
    assert ep.prompt_ids == tuple([tok.bos_token_id] + tok("Q: 37*58=", add_special_tokens=False).input_ids)
    assert ep.transcript == "no</s>\nsure?\nyes</s>" and ep.reward_parts == {"nudge": 1.0} and ep.finished


def test_env_import_path_loads_the_class_or_names_the_field():
    factory = make_env_factory(EnvConfig(import_path="tests.algorithms.test_episodes:Opener"))
    assert isinstance(factory(), Opener) and factory() is not factory()  # a new environment per episode
    for path, error in (("tests.rlkit.no_such_module:Opener", "cannot import module 'tests.rlkit.no_such_module'"),
                        ("tests.algorithms.test_episodes:Closer", "module 'tests.algorithms.test_episodes' has no attribute")):
        with pytest.raises(RecipeError, match=f"^env.import_path: {error}"):
            make_env_factory(EnvConfig(import_path=path))


class KeepGoing(Environment):
    """Answers every turn with a line of its own and never ends: the episode runs to max_turns."""

    def step(self, message):
        return StepResult([{"role": "user", "content": "more"}], done=False)


@pytest.mark.slow
def test_real_engine_episode_logprobs_equal_the_trainers_on_the_whole_episode(tmp_path):
    """A random tiny Llama served by vLLM; its generation config stops on any digit as well as EOS, so turns end
    at a stop token often enough for episodes of several turns. The trainer model's log-probs of every sampled
    token, computed on prompt + whole episode in one forward, equal the engine's: the context the engine sampled
    each turn from is exactly the ids the trainer trains on."""
    import torch
    from transformers import GenerationConfig

    from rlkit.data.chat import stop_token_ids
    from rlkit.recipe import ModelConfig
    from rlkit.training.modeling import init_model, save_checkpoint
    from rlkit.training.trainer import sequence_logprobs
    from rlkit.training.batches import pack_sequences
    from rlkit.rollout import EngineConfig
    from rlkit.rollout.vllm_engine import VllmRollout

    model, tok = init_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                                        max_seq_len=128))
    path = save_checkpoint(model, tok, tmp_path / "ckpt", "")
    digits = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    GenerationConfig(eos_token_id=[tok.eos_token_id, *digits]).save_pretrained(path)
    renderer = Renderer(tok, DataConfig(chat_template="none"), stop_token_ids(str(path)))
    problems = [Problem(p, "", "", prompt_ids=tuple(renderer.prompt_ids(Problem(p, "", "")))) for p in ("12*34=", "5+")]
    # float32 as the trainer model: `auto` is bf16 on a CPU with native bf16, whose rounding (up to ~2e-3 here)
    # would blur a log-prob the test tells apart from a wrong context's
    engine = VllmRollout(EngineConfig(max_new_tokens=16, dtype="float32"), str(path), max_model_len=128)
    try:
        assert engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching  # turns reuse earlier KV
        groups = run_episodes(engine, renderer, KeepGoing, problems, 4, 1.0, 7, max_turns=3, max_episode_tokens=90,
                              max_new_tokens=16)
    finally:
        engine.close()
    episodes = [e for g in groups for e in g]
    assert max(e.turns for e in episodes) >= 2 and any(0 in e.loss_mask for e in episodes)  # several turns
    prompts = [list(p.prompt_ids) for p in problems for _ in range(4)]
    batch = pack_sequences(prompts, [list(e.token_ids) for e in episodes], tok.pad_token_id)
    with torch.no_grad():
        trainer_lp, _ = sequence_logprobs(model.eval(), batch)
    for i, (p, e) in enumerate(zip(prompts, episodes)):
        got = trainer_lp[i, len(p) - 1 : len(p) - 1 + len(e.token_ids)]  # (L,) log-prob of each episode token
        sampled = torch.tensor(e.loss_mask, dtype=torch.bool)
        assert torch.allclose(got[sampled], torch.tensor(e.logprobs)[sampled], atol=1e-4)
        assert all(lp == 0.0 for lp, m in zip(e.logprobs, e.loss_mask) if not m)
