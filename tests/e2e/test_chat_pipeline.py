"""The practitioner's path end to end on CPU: recipes/gsm8k_qwen.yaml's code path on a tiny tied-embedding Qwen2
chat model built at test time (byte-level BPE trained on the vendored GSM8K text, ChatML template), each stage with
its own data: SFT on a `messages` file → offline DPO on a preference file → GRPO on GSM8K prompts rendered with
the chat template and a system prompt, judged by the math reward.

The model is random, so no accuracy is asserted; what is checked is that the data reached the model as the recipe
says: the template and the system prompt in every prompt (and in the engine: the engine's log-probs of its own
samples equal the trainer's on the same ids), the SFT mask on assistant tokens only, the DPO pairs from the file,
the tie kept in every checkpoint.
"""

import json

import pytest
from safetensors.torch import load_file

from tests.practitioner_data import SYSTEM, write_files
from tests.e2e.test_quickstart import read_metrics, run


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, chat_model_path):
    folder = tmp_path_factory.mktemp("practitioner")
    files = write_files(folder / "data")
    run_dir = folder / "run"
    stages = (f"stages=[{{kind: sft, steps: 6, batch_size: 8, lr: 1.0e-3, data: {{source: {files['messages']}}}}},"
              f" {{kind: dpo, pairs: dataset, steps: 3, batch_size: 4, lr: 1.0e-4,"
              f"   data: {{source: {files['preferences']}, prompt_key: prompt}}}},"
              " {kind: grpo, steps: 2, batch_size: 2, lr: 1.0e-4}]")
    proc = run("recipes/gsm8k_qwen.yaml", f"model.path={chat_model_path}", "model.max_seq_len=384",
               "data.source=data/gsm8k_test.jsonl", "data.subset=''", "data.eval_source=''", "data.num_eval=8",
               f"data.system_prompt='{SYSTEM}'", "data.max_prompt_tokens=256", "rollout.max_new_tokens=16",
               "rollout.kv_cache_gib=1", "algo.group_size=4", "ref.kl_coef=0", "trainer.micro_batch_size=8",
               "cluster.backend=local",
               "cluster.gpus_per_trainer=0", "cluster.gpus_per_engine=0", "logging.eval_every=0",
               "logging.wandb_mode=disabled", f"logging.output_dir={run_dir}", stages,
               "evals=[{name: gsm8k_head, max_new_tokens: 24, data: {eval_source: data/gsm8k_test.jsonl, "
               "num_eval: 4, prompt_template: '{prompt} Answer after ####.'}}]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, files, json.loads((run_dir / "data.json").read_text()), proc


@pytest.mark.slow
def test_every_stage_trains_on_its_own_data_through_the_chat_template(chat_run, chat_model_path):
    from transformers import AutoTokenizer

    run_dir, files, data, _ = chat_run
    tok = AutoTokenizer.from_pretrained(chat_model_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["kind"] for s in summary["stages"]] == ["sft", "dpo", "grpo"]
    sft, dpo, grpo = data["stages"]

    # prompts: exactly what transformers' chat template renders for the system prompt and verl's instruction after
    # the question, in evaluation and in GRPO
    instruction = " Let's think step by step and output the final answer after \"####\"."
    for prompt in (data["held_out"]["text"], grpo["first"]["text"]):
        question = prompt.split("<|im_start|>user\n")[1].split(instruction)[0]
        assert prompt == tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": question + instruction}],
                                                 add_generation_prompt=True, tokenize=False)
    assert grpo["format"] == "prompt_only" and data["held_out"]["chat_template"] and grpo["chat_template"]

    # SFT: a conversation of the file, its assistant turns (through <|im_end|>) and nothing else trained
    assert sft["format"] == "messages" and sft["kept"] + sft["dropped_long"] == 96 and sft["kept"] > 80
    conversations = [json.loads(line)["messages"] for line in files["messages"].read_text().splitlines()]
    assistant_turns = ["".join(m["content"] + "<|im_end|>" for m in c if m["role"] == "assistant")
                       for c in conversations]
    assert sft["first"]["trained"] in assistant_turns
    assert "<|im_start|>" not in sft["first"]["trained"] and sft["first"]["text"].startswith("<|im_start|>system")

    # DPO: every pair from the file, rendered with the template
    rows = [json.loads(line) for line in files["preferences"].read_text().splitlines()]
    assert dpo["format"] == "preference" and dpo["rows"] == dpo["kept"] + dpo["dropped_long"] == len(rows)
    assert dpo["first"]["chosen"] in {r["chosen"] + "<|im_end|>" for r in rows}
    assert dpo["first"]["rejected"] in {r["rejected"] + "<|im_end|>" for r in rows}
    metrics = read_metrics(run_dir)
    assert [m["dpo/data/kept"] for m in metrics if "dpo/data/kept" in m] == [dpo["kept"]] and dpo["kept"] > 40

    # GRPO (ref.kl_coef 0: no reference model, no kl logged): the engine sampled from the ids the trainer trains
    # on (float32 on CPU: their log-probs agree)
    assert not any("grpo/kl" in m for m in metrics) and any("grpo/loss" in m for m in metrics)
    rollout_kl = [m["grpo/rollout_kl"] for m in metrics if "grpo/rollout_kl" in m]
    assert rollout_kl and all(abs(kl) < 1e-4 for kl in rollout_kl), rollout_kl


@pytest.mark.slow
def test_a_further_eval_set_is_evaluated_before_and_after_every_stage(chat_run):
    run_dir, _, data, proc = chat_run
    head = data["evals"]["gsm8k_head"]
    assert head["count"] == 4 and SYSTEM in head["text"] and "Answer after ####." in head["text"]
    assert "Let's think step by step" not in head["text"]  # its own template, not the recipe's
    metrics = read_metrics(run_dir)
    assert len([m for m in metrics if "eval/gsm8k_head/accuracy" in m]) == 4  # before stage 0, after each of 3
    assert len([m for m in metrics if "eval/accuracy" in m]) == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage in summary["stages"]:
        assert {"gsm8k_head/accuracy", "accuracy"} <= set(stage["before"]) & set(stage["after"])
    tables = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert {t["table"] for t in tables} >= {"eval/completions", "eval/gsm8k_head/completions"}
    assert "; gsm8k_head " in proc.stdout


@pytest.mark.slow
def test_tied_embeddings_stay_tied_in_every_checkpoint(chat_run):
    run_dir = chat_run[0]
    for name in ("00_init", "01_sft", "02_dpo", "03_grpo"):
        folder = run_dir / "checkpoints" / name
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
        tensors = load_file(str(folder / "model.safetensors"))
        assert "lm_head.weight" not in tensors or (tensors["lm_head.weight"] == tensors["model.embed_tokens.weight"]).all()
