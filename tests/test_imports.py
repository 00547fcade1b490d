"""Imports go one way: rlkit imports the leaf packages (rewards/, rollout/, kernels/), never the reverse.

Each leaf takes its own small config (rollout.EngineConfig, rewards.scorer.ScorerConfig, rewards.registry.RewardSpec),
so importing any leaf module must load no rlkit module, and no leaf source may import rlkit, not even inside a
function or a docstring example (a local import is how a cycle hides).
"""

import ast
import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ("rewards", "rollout", "kernels")
# rewards/_harness.py is the program a sandbox runs (passed with -c): importing it would run it. Its source is checked.
NOT_IMPORTABLE = {"rewards._harness"}


def leaf_files() -> list[Path]:
    return sorted(path for leaf in LEAVES for path in (ROOT / leaf).glob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str) -> set[str]:
    """Every module an import statement names, at any depth of the code or of a `>>>` example."""
    trees = [ast.parse(source)]
    for example in doctest.DocTestParser().get_examples(source):
        try:
            trees.append(ast.parse(example.source))
        except SyntaxError:  # an example continued over several `>>>` lines: the test of its own module runs it
            pass
    names = set()
    for node in (node for tree in trees for node in ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


# Run in a fresh interpreter, so nothing the test session has imported hides a leaf's import of rlkit.
PROBE = """
import importlib, json, sys
found, skipped = {}, {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:  # an optional dependency of a GPU path (triton) that this machine lacks
        if e.name.split(".")[0] in ("rlkit", "rewards", "rollout", "kernels"):
            raise
        skipped[name] = e.name
        continue
    found[name] = sorted(m for m in sys.modules if m == "rlkit" or m.startswith("rlkit."))
print(json.dumps({"rlkit": found, "skipped": skipped}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    """For each leaf module (imported one after another), the rlkit modules loaded by the time it was imported."""
    names = [module_name(p) for p in leaf_files() if module_name(p) not in NOT_IMPORTABLE]
    done = subprocess.run([sys.executable, "-c", PROBE, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_leaf_module_is_probed(probe):
    names = {module_name(p) for p in leaf_files()} - NOT_IMPORTABLE
    assert {"rewards.scorer", "rewards.judge", "rollout", "rollout.vllm_engine", "kernels.logprobs"} <= names
    assert set(probe["rlkit"]) | set(probe["skipped"]) == names
    assert set(probe["skipped"]) <= {"kernels._triton_logprobs", "kernels._triton_scan"}, probe["skipped"]


def test_importing_a_leaf_loads_no_rlkit_module(probe):
    pulled = {name: modules for name, modules in probe["rlkit"].items() if modules}
    assert not pulled, f"leaf modules that load rlkit: {pulled}"


@pytest.mark.parametrize("path", leaf_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_leaf_source_never_imports_rlkit(path):
    climbing = sorted(m for m in imported_modules(path.read_text()) if m == "rlkit" or m.startswith("rlkit."))
    assert not climbing, f"{path.relative_to(ROOT)} imports {climbing}; take a config of the leaf's own instead"


def test_the_source_check_sees_local_and_docstring_imports():
    source = 'def f():\n    from rlkit.config import RecipeError\n\n"""\n>>> import rlkit.modeling\n"""\n'
    assert imported_modules(source) == {"rlkit.config", "rlkit.modeling"}
