"""The console filter: vLLM's known-harmless messages are dropped, every other message reaches the user."""

import json
import logging
import logging.config
import os
import subprocess
import sys
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from rlkit.rollout.vllm_console import (ALIVE, KNOWN_NOISE, KnownNoise, claim_sync_folder, logging_config,
                                        mapped_segments, process_tree, quiet_vllm_console, shm_segments)


@pytest.fixture
def restore_vllm_logger():
    logger = logging.getLogger("vllm")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_known_noise_is_dropped_and_real_warnings_kept(restore_vllm_logger, capsys):
    logging.config.dictConfig(logging_config("WARNING"))  # as vLLM's processes configure it under rlkit
    vllm_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    for prefix, _ in KNOWN_NOISE:
        vllm_logger.warning(prefix + " and the rest of the message")
    vllm_logger.warning("%s: Failed to load weights", "RotaryEmbedding")
    vllm_logger.warning("Following weights were not loaded from checkpoint: %s", {"model.embed_tokens.weight"})
    assert capsys.readouterr().out == ""
    vllm_logger.warning("%s: Failed to load weights", "QKVParallelLinear")  # a real layer: the user must see it
    vllm_logger.warning("Following weights were not loaded from checkpoint: %s", {"lm_head.weight"})
    vllm_logger.info("Enforce eager set")  # below the level anyway
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "QKVParallelLinear: Failed to load weights" in out[0] and "lm_head.weight" in out[1]


def test_filter_reads_the_format_string_not_the_rendered_text():
    """A message that merely quotes a known one (e.g. a model's output in an error) is not dropped."""
    record = logging.LogRecord("vllm", logging.ERROR, "f.py", 1, "request failed: %s", ("Enforce eager set",), None)
    assert KnownNoise().filter(record)


def test_an_inherited_path_to_a_missing_file_of_ours_is_rewritten_and_a_users_own_is_kept(monkeypatch, tmp_path,
                                                                                          restore_vllm_logger):
    """A Ray node started from a shell where rlkit had run inherits VLLM_LOGGING_CONFIG_PATH naming a file in that
    machine's /tmp (tests/multinode found it: vLLM refused to start on the other node)."""
    monkeypatch.delenv("RLKIT_VLLM_VERBOSE", raising=False)
    for name in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS"):  # it sets these too: restored after
        monkeypatch.setenv(name, os.environ.get(name, "WARNING" if name == "VLLM_LOGGING_LEVEL" else ""))
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", str(tmp_path / "elsewhere" / "rlkit_vllm_logging_0_ERROR_x.json"))
    quiet_vllm_console()
    written = Path(os.environ["VLLM_LOGGING_CONFIG_PATH"])
    assert written.exists() and json.loads(written.read_text())["filters"]["known_noise"]
    own = tmp_path / "my_logging.json"
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", str(own))
    quiet_vllm_console()
    assert os.environ["VLLM_LOGGING_CONFIG_PATH"] == str(own)  # the user's choice, even before they write it


def test_an_engine_claims_only_the_segments_its_own_processes_map():
    # two engines starting on one node both make psm_* segments while the other starts: each must claim only its
    # own, or closing one unlinks the other's (found as vLLM start-up failures, FileNotFoundError: /psm_...)
    hold = ("import sys, time; from multiprocessing import resource_tracker, shared_memory; "
            "m = shared_memory.SharedMemory(name=sys.argv[1]); "
            "resource_tracker.unregister(m._name, 'shared_memory'); "  # attached, not owned (Python < 3.13 registers)
            "print(m.name, flush=True); time.sleep(60)")
    ours = shared_memory.SharedMemory(create=True, size=4096)
    theirs = shared_memory.SharedMemory(create=True, size=4096)  # stands for another engine's segment
    child = subprocess.Popen([sys.executable, "-c", hold, ours.name], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == ours.name
        tree = process_tree(os.getpid())
        assert {os.getpid(), child.pid} <= tree and 1 not in tree
        ours.close()  # this process no longer maps it: the child does
        theirs.close()
        assert {ours.name, theirs.name} <= shm_segments()
        assert mapped_segments({child.pid}) == {ours.name}
    finally:
        child.kill()
        child.wait(timeout=10)
        ours.unlink()
        theirs.unlink()


CLAIM_AND_WAIT = """
import sys, time
from pathlib import Path
from rlkit.rollout.vllm_console import claim_sync_folder
handle, _ = claim_sync_folder(Path(sys.argv[1]))
(Path(sys.argv[1]) / "model.safetensors").write_bytes(b"weights")
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_sync_folder_left_by_a_killed_engine_is_removed_and_a_living_engines_is_kept(tmp_path):
    """An engine killed with SIGKILL never runs close(): the next engine on the node removes its folder (a whole
    model under /dev/shm), by its lock, which the kernel drops when the process ends."""
    owners = {name: subprocess.Popen([sys.executable, "-c", CLAIM_AND_WAIT, str(tmp_path / name)],
                                     stdout=subprocess.PIPE, text=True) for name in ("dead", "living")}
    try:
        for proc in owners.values():
            assert proc.stdout.readline().strip() == "claimed"
        owners["dead"].kill()
        owners["dead"].wait(timeout=30)
        (tmp_path / "not_an_engines").mkdir()  # no lock file: not ours to judge
        handle, removed = claim_sync_folder(tmp_path / "new")
        assert removed == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["living", "new", "not_an_engines"]
        assert (tmp_path / "living" / "model.safetensors").read_bytes() == b"weights"
        assert (tmp_path / "new" / ALIVE).is_file()
        handle.close()
    finally:
        for proc in owners.values():
            proc.kill()
            proc.wait(timeout=30)
