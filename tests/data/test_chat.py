"""Rendering (rlkit.data.chat) against transformers' own apply_chat_template, on a ChatML tokenizer and the embedded
character tokenizer."""

import pytest

from rlkit.data.chat import Renderer
from rlkit.recipe import DataConfig, RecipeError
from rlkit.data.tasks import Conversation, Preference, Problem
from rlkit.training.modeling import build_char_tokenizer
from tests.chat_model import build_tokenizer

SYSTEM = "You are a careful solver."
TEMPLATE = "{prompt}\nPut the final answer after ####."


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_prompt_is_the_templates_user_turn_with_system_prompt(tok):
    r = Renderer(tok, DataConfig(system_prompt=SYSTEM, prompt_template=TEMPLATE))
    expected = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "2+3?\nPut the final answer after ####."}],
        add_generation_prompt=True, tokenize=False)
    assert expected.endswith("<|im_start|>assistant\n")
    assert r.prompt_ids(Problem("2+3?", "5", "5")) == ids(tok, expected)


def test_reply_ends_at_the_turns_stop_token_and_continues_the_prompt(tok):
    r = Renderer(tok, DataConfig())
    problem = Problem("2+3?", "5", "It is 5.\n#### 5")
    prompt, reply = r.prompt_ids(problem), r.reply_ids(problem, problem.solution)
    assert reply[-1] == tok.convert_tokens_to_ids("<|im_end|>") and reply.count(reply[-1]) == 1
    full = tok.apply_chat_template([{"role": "user", "content": "2+3?"},
                                    {"role": "assistant", "content": problem.solution}], tokenize=False)
    # the whole conversation's ids, less the newline ChatML puts after <|im_end|>
    assert prompt + reply == ids(tok, full)[:-1] and tok.decode(reply) == "It is 5.\n#### 5<|im_end|>"
    example, mask = r.example(problem)
    assert example == prompt + reply and mask == [0] * len(prompt) + [1] * len(reply)


def test_multi_turn_conversation_trains_every_assistant_turn_and_nothing_else(tok):
    turns = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
             {"role": "assistant", "content": "2"}, {"role": "user", "content": "times 3?"},
             {"role": "assistant", "content": "6"})
    r = Renderer(tok, DataConfig(system_prompt="ignored: the conversation has its own"))
    example, mask = r.example(Conversation(turns))
    assert tok.decode(example) == tok.apply_chat_template(list(turns), tokenize=False).rstrip("\n")
    trained = [t for t, m in zip(example, mask) if m]
    assert tok.decode(trained) == "2<|im_end|>6<|im_end|>"
    # a prompt-completion conversation trains its completion only
    _, mask = r.example(Conversation(turns, first_trained=4))
    assert tok.decode([t for t, m in zip(example, mask) if m]) == "6<|im_end|>"


def test_preference_pair_shares_the_prompt(tok):
    r = Renderer(tok, DataConfig())
    prompt = ({"role": "user", "content": "2+2?"},)
    pair = r.pair(Preference("2+2?", ({"role": "assistant", "content": "4"},),
                             ({"role": "assistant", "content": "5"},), messages=prompt))
    assert pair[0] == ids(tok, tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False))
    assert tok.decode(pair[1]) == "4<|im_end|>" and tok.decode(pair[2]) == "5<|im_end|>"
    assert r.pair(Preference("2+2?", "4", "5")) == pair  # text columns become the same turns


def test_plain_text_without_a_template(tok):
    char = build_char_tokenizer()
    r = Renderer(char, DataConfig(system_prompt="Add.", prompt_template="Q: {prompt}"))
    assert r.prompt_ids(Problem("1+2=", "3", "3")) == [char.bos_token_id] + ids(char, "Add.\nQ: 1+2=")
    assert r.reply_ids(Problem("1+2=", "3", "3"), "3") == ids(char, "3") + [char.eos_token_id]
    off = Renderer(tok, DataConfig(chat_template="none"))  # a chat tokenizer with its template switched off
    assert off.prompt_ids(Problem("1+2=", "3", "3")) == ids(tok, "1+2=")  # no BOS: it has none
    with pytest.raises(RecipeError, match="conversational data needs a chat template"):
        off.example(Conversation(({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})))


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    # drops every assistant turn but the last (as templates that strip earlier reasoning do)
    tok = build_tokenizer()
    tok.chat_template = (
        "{%- for m in messages %}{%- if m['role'] != 'assistant' or loop.last %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    turns = ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"})
    with pytest.raises(RecipeError, match="does not render the start of a conversation as a prefix"):
        Renderer(tok, DataConfig()).example(Conversation(turns))


def test_environment_turns_are_the_templates_text_after_the_sampled_stop_token(tok):
    # ChatML renders "<|im_end|>\n" after an assistant turn; the engine stops at <|im_end|>, so the "\n" is the
    # environment's, then the tool turn, then the next generation prompt
    r = Renderer(tok, DataConfig())
    history = [{"role": "user", "content": "37*58?"}, {"role": "assistant", "content": "<tool_call>{}</tool_call>"}]
    env = r.env_ids(history, [{"role": "tool", "content": "2146"}])
    assert env == ids(tok, "\n<|im_start|>tool\n2146<|im_end|>\n<|im_start|>assistant\n")
    reply = r.assistant_ids(history[:1], history[1]["content"])
    assert reply == ids(tok, "<tool_call>{}</tool_call><|im_end|>")


def test_plain_environment_turns_are_wrapped_on_their_own_lines():
    tok = build_char_tokenizer()
    r = Renderer(tok, DataConfig(chat_template="none"))
    env = r.env_ids([], [{"role": "tool", "content": "2146"}, {"role": "user", "content": "and?"}])
    assert tok.decode(env) == "\n<tool_response>2146</tool_response>\nand?\n"
    assert r.assistant_ids([], "12") == ids(tok, "12") + [tok.eos_token_id]


def test_environment_turns_under_a_template_that_rewrites_earlier_turns_are_refused():
    tok = build_tokenizer()  # drops the tool turn's content once an assistant follows: not a prefix
    tok.chat_template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + (m['content'] if loop.last or "
        "m['role'] != 'tool' else '') + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    trace = ({"role": "assistant", "content": "call"}, {"role": "tool", "content": "4"},
             {"role": "assistant", "content": "4"})
    with pytest.raises(RecipeError, match="does not render the start of a conversation as a prefix"):
        Renderer(tok, DataConfig()).episode_example(Problem("2+2?", "4", "4"), trace)
