"""Every stage's data prepared at load time (rlkit.data.prepare): per-stage sources, what each kind needs, the held-out
split, and the length limits."""

import json
import re

import pytest

from rlkit.recipe import RecipeError, load_recipe
from rlkit.data.chat import Renderer
from rlkit.data.tasks import Problem
from rlkit.data.prepare import describe, fit_examples, fit_pairs, prepare_run_data
from tests.chat_model import build_tokenizer
from tests.practitioner_data import GSM8K, SYSTEM, gsm8k_rows, write_files

PROMPTS = [f"data.source={GSM8K}", "data.prompt_key=question", "data.num_eval=20", f"data.system_prompt='{SYSTEM}'",
           "model.max_seq_len=512", "rollout.max_new_tokens=64"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("data"))


def prepare(tok, *overrides):
    return prepare_run_data(load_recipe(None, list(overrides)), tok)


def test_each_stage_trains_on_its_own_data(tok, files):
    stages = (f"stages=[{{kind: sft, data: {{source: {files['messages']}}}}},"
              f" {{kind: dpo, pairs: dataset, data: {{source: {files['preferences']}, prompt_key: prompt,"
              " system_prompt: ''}},"
              " {kind: grpo}]")
    data = prepare(tok, *PROMPTS, stages)
    sft, dpo, grpo = data.stages
    assert (sft.format, len(sft.examples), dpo.format, len(dpo.pairs)) == ("messages", 96, "preference", 48)
    assert grpo.format == "prompt_only" and len(grpo.problems) == 1319 - 20
    # GRPO trains on the recipe's training split: never on a held-out prompt
    assert not {p.prompt for p in grpo.problems} & {p.prompt for p in data.held_out}
    # the system prompt reaches the recipe's stages, not the one whose data section clears it
    assert tok.decode(grpo.problems[0].prompt_ids).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    assert tok.decode(sft.examples[0][0]).startswith(f"<|im_start|>system\n{SYSTEM}")
    prompt, chosen, _ = dpo.pairs[0]
    assert tok.decode(prompt).startswith("<|im_start|>user\n")
    chosen_texts = {r["chosen"] + "<|im_end|>" for r in map(json.loads, files["preferences"].read_text().splitlines())}
    assert {tok.decode(c) for _, c, _ in dpo.pairs} == chosen_texts  # every pair is the file's


def test_a_stage_reading_the_recipes_source_never_sees_held_out_rows(tok):
    # an SFT stage on the same file (prompts with worked answers) but other rendering settings
    data = prepare(tok, *PROMPTS, "stages=[{kind: sft, data: {prompt_template: 'Q: {prompt}'}}, {kind: grpo}]")
    held = {p.prompt for p in data.held_out}
    sft_texts = [tok.decode(ids) for ids, _ in data.stages[0].examples]
    assert len(sft_texts) + data.stages[0].stats["dropped_long"] == 1319 - 20 and not any(f"Q: {q}<|im_end|>" in t for t in sft_texts for q in held)


@pytest.mark.parametrize("stages, message", [
    ("[{kind: grpo, data: {source: MESSAGES}}]", "a grpo stage samples answers and scores them against a gold answer"),
    ("[{kind: sft, data: {source: PREFERENCES, prompt_key: prompt}}]", "an sft stage cannot train on a preference dataset"),
    ("[{kind: dpo, pairs: dataset}]", "pairs=dataset needs a preference dataset"),
    ("[{kind: grpo, data: {answer_key: nope}}]", "needs prompts with a 'nope' column"),
], ids=["grpo-on-messages", "sft-on-preferences", "dataset-dpo-on-prompts", "no-answers"])
def test_a_stage_given_the_wrong_kind_of_data_fails_at_load(tok, files, stages, message):
    stages = stages.replace("MESSAGES", str(files["messages"])).replace("PREFERENCES", str(files["preferences"]))
    with pytest.raises(RecipeError, match=message):
        prepare(tok, *PROMPTS, f"stages={stages}")


def test_held_out_needs_answers(tok, files):
    with pytest.raises(RecipeError, match="held-out evaluation needs prompts with gold answers"):
        prepare(tok, f"data.source={files['messages']}", "data.num_eval=5", "model.max_seq_len=512",
                "stages=[{kind: sft}]")


def test_long_prompts_are_dropped_and_counted(tok, caplog):
    lengths = [len(tok(r["question"]).input_ids) for r in gsm8k_rows(0, 1319)]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the prompts are longer
    data = prepare(tok, *PROMPTS, "data.chat_template=none", "data.system_prompt=''", f"data.max_prompt_tokens={limit}",
                   "stages=[{kind: grpo}]")
    stats = data.stages[0].stats
    assert stats["kept"] + stats["dropped_long"] == stats["rows"] == 1319 - 20
    assert 0.3 < stats["dropped_long"] / stats["rows"] < 0.7
    assert all(len(p.prompt_ids) <= limit for p in data.stages[0].problems + data.held_out)
    assert any("dropped" in r.message and "stage 0 (grpo)" in r.message for r in caplog.records)
    # the context bounds prompts too: max_seq_len - max_new_tokens
    data = prepare(tok, *PROMPTS, "model.max_seq_len=160", "rollout.max_new_tokens=60", "stages=[{kind: grpo}]")
    assert max(len(p.prompt_ids) for p in data.stages[0].problems) <= 100 and data.stages[0].stats["dropped_long"]


def test_further_eval_sets_render_with_their_own_section_and_answer_length(tok):
    """Synthetic arithmetic trains; GSM8K is a further held-out set with its own prompt column, template, size and
    answer length (which bounds its prompts: max_seq_len - its max_new_tokens)."""
    gsm8k = (f"evals=[{{name: gsm8k, max_new_tokens: 300, data: {{eval_source: {GSM8K}, num_eval: 40, "
             "prompt_key: question, prompt_template: '{prompt} Answer after ####.'}}]")
    cfg = load_recipe(None, ["data.num_eval=10", "model.max_seq_len=400", "rollout.max_new_tokens=16", gsm8k,
                             "stages=[{kind: grpo}]"])
    data = prepare_run_data(cfg, tok)
    [e] = data.evals
    renderer = Renderer(tok, cfg.eval_data(0))
    lengths = [len(renderer.prompt_ids(Problem(r["question"], "", ""))) for r in gsm8k_rows(0, 40)]
    assert e.name == "gsm8k" and e.max_new_tokens == 300 and len(data.held_out) == 10
    assert 0 < len(e.problems) == sum(n <= 100 for n in lengths) < 40  # 400 - 300 tokens of prompt at most
    assert e.problems[0].prompt_ids == tuple(renderer.prompt_ids(e.problems[0]))
    assert "Answer after ####." in renderer.text(e.problems[0].prompt_ids)
    assert describe(data)["evals"]["gsm8k"]["count"] == len(e.problems)


@pytest.mark.parametrize("evals, message", [
    ("[{name: gsm8k}]", "evals.0.data.eval_source: required"),
    (f"[{{name: task, data: {{eval_source: {GSM8K}}}}}]", "evals.0.name: 'task' must be unique"),
    (f"[{{name: a, data: {{eval_source: {GSM8K}}}}}, {{name: a, data: {{eval_source: {GSM8K}}}}}]",
     "evals.1.name: 'a' must be unique"),
    ("[{name: a, data: {eval_source: missing.jsonl}}]", "evals.0.data.eval_source: file 'missing.jsonl' not found"),
    ("[{name: a, data: {eval_sorce: x}}]", "Did you mean 'eval_source'"),
    (f"[{{name: a, max_new_tokens: 64, data: {{eval_source: {GSM8K}}}}}]", "evals.0.max_new_tokens: must be in"),
])
def test_bad_eval_sets_fail_at_load(evals, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(None, [f"evals={evals}"])


def test_sft_and_dpo_truncation():
    examples = [([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1]), ([1, 2, 3], [0, 0, 1])]
    assert fit_examples(examples, 4, "drop")[0] == examples[1:]
    assert fit_examples(examples, 4, "truncate_left")[0] == [([3, 4, 5, 6], [0, 1, 1, 1]), examples[1]]
    assert fit_examples(examples, 4, "truncate_right")[0] == [([1, 2, 3, 4], [0, 0, 0, 1]), examples[1]]
    # cut right, the only trained token left is the first, which is never a target: dropped
    assert fit_examples([([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1])], 3, "truncate_right")[1]["dropped_long"] == 1
    pairs = [([1, 2, 3, 4], [5, 6], [7, 8, 9])]
    assert fit_pairs(pairs, 5, "drop")[0] == []
    assert fit_pairs(pairs, 5, "truncate_left")[0] == [([3, 4], [5, 6], [7, 8, 9])]
    assert fit_pairs(pairs, 5, "truncate_right")[0] == [([1, 2, 3, 4], [5], [7])]
    assert fit_pairs(pairs, 3, "truncate_left")[0] == []  # the replies alone are too long


def test_long_sft_conversations_are_truncated_by_the_recipes_rule(tok, files):
    common = [*PROMPTS, "model.max_seq_len=200", f"stages=[{{kind: sft, data: {{source: {files['messages']}}}}}]"]
    dropped = prepare(tok, *common).stages[0].stats
    kept = prepare(tok, *common, "data.truncation=truncate_right").stages[0].stats
    assert dropped["dropped_long"] > 0 and kept["truncated"] > 0
    # only an example whose prompt alone fills the context is still dropped: nothing of its reply would be left
    assert kept["truncated"] + kept["dropped_long"] == dropped["dropped_long"] and kept["dropped_long"] <= 1
