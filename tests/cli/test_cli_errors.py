"""Bad input to `python -m rlkit.run` ends in one `error:` line naming the key, exit code 2 and no run folder:
a table of the cases users hit, and a fuzz over the recipe's numeric fields. In-process (`rlkit.run.main`), since
each fails before anything heavy starts."""

import json
import random

import pytest

from rlkit.recipe import NUMERIC_RANGES
from rlkit.run import main

RECIPE = "recipes/quickstart.yaml"


def run_main(capsys, tmp_path, *overrides):
    out = tmp_path / "run"
    code = main([RECIPE, f"logging.output_dir={out}", "logging.wandb_mode=disabled", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    return code, errors, out


def bad_files(tmp_path):
    (tmp_path / "not_object.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n42\n')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    (tmp_path / "messages.jsonl").write_text(json.dumps({"messages": "hi"}) + "\n")
    (tmp_path / "a_file").write_text("")


CASES = [
    (["trainer.lr=-1"], "trainer.lr: must be > 0, got -1"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size: must be > 0, got 0"),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens: must be > 0, got 0"),
    (["rollout.top_p=1.5"], "rollout.top_p: must be in (0, 1]"),
    (["stages.1.lr=0"], "stages.1.lr: must be > 0"),
    (["data.source=TMP/not_object.jsonl"], "not_object.jsonl line 2 is a JSON int, not an object"),
    (["data.source=TMP/latin1.jsonl"], "latin1.jsonl line 2 is not UTF-8 text"),
    (["stages.0.data={source: TMP/messages.jsonl}"], "messages.jsonl row 1: field 'messages' must be text or a "
                                                      "non-empty list"),
    (["logging.output_dir=TMP/a_file/run"], "logging.output_dir: cannot create"),
    (["model.path=TMP/nowhere"], "model.path: 'TMP/nowhere' is not a folder"),
    (["stages.0.data={source: TMP/nowhere.jsonl}"], "stages.0.data.source: file 'TMP/nowhere.jsonl' not found"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[c[0][0].split("=")[0] + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_no_run_folder(capsys, tmp_path, overrides, message):
    bad_files(tmp_path)
    overrides = [o.replace("TMP", str(tmp_path)) for o in overrides]
    code, errors, out = run_main(capsys, tmp_path, *overrides)
    assert code == 2 and len(errors) == 1, errors
    assert message.replace("TMP", str(tmp_path)) in errors[0], errors[0]
    assert not out.exists()


def test_fuzzed_numeric_fields_fail_in_one_line_naming_the_key(capsys, tmp_path):
    """Random wrong types and out-of-range values for every numeric field of the recipe."""
    rng = random.Random(0)
    bad_values = {"> 0": ["0", "-1", ".nan", "-.inf"], ">= 0": ["-1", "-0.5", ".nan"],
                  "in (0, 1]": ["0", "1.5", "-2"], "in (0, 1)": ["0", "1", "7"], "in [0, 1]": ["-0.1", "1.01"]}
    cases = [(key, value) for rule, keys in NUMERIC_RANGES.items() for key in keys for value in bad_values[rule]]
    cases = rng.sample(cases, 40) + [(key, rng.choice(["abc", "[1, 2]", "{a: 1}"])) for key in
                                     rng.sample([k for keys in NUMERIC_RANGES.values() for k in keys], 10)]
    for key, value in cases:
        code, errors, out = run_main(capsys, tmp_path, f"{key}={value}")
        assert code == 2 and len(errors) == 1 and key in errors[0], (key, value, errors)
        assert not out.exists()


def test_sigterm_ends_the_run_by_an_exception_so_its_cleanup_runs():
    """`kill`/`timeout`/a scheduler send SIGTERM; the run must unwind (closing vLLM's processes), not vanish."""
    import os
    import signal

    from rlkit.run import exit_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    cleaned = []
    try:
        exit_on_sigterm()
        with pytest.raises(SystemExit) as stop:
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
            finally:
                cleaned.append(True)
        assert stop.value.code == 128 + signal.SIGTERM and cleaned == [True]
    finally:
        signal.signal(signal.SIGTERM, previous)
