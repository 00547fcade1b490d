"""Imports go one way, down the layers of rlkit's package docstring, and rlkit claims no top-level name but `rlkit`.

Layers, bottom to top: the leaves (rlkit.kernels, rlkit.rollout, rlkit.rewards, rlkit.envs; code in the repository's
top-level folders of those names), rlkit.recipe, rlkit.data, rlkit.training, rlkit.runtime, rlkit.algorithms,
rlkit.orchestration, and the command-line tools (rlkit's top-level modules). A module may import its own package and
the packages `ALLOWED` lists for it, and nothing else of rlkit: not inside a function, not in a docstring example (a
local import is how a cycle hides). There is no import cycle between modules, and no `TYPE_CHECKING` import.
"""

import ast
import doctest
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ("kernels", "rollout", "rewards", "envs")  # repository folders, installed as rlkit.<leaf>
_LEAF_PACKAGES = {f"rlkit.{leaf}" for leaf in LEAVES}
# what each package may import of rlkit besides itself ("rlkit": the command-line tools, rlkit's top-level modules)
ALLOWED = {
    "rlkit.kernels": set(),
    "rlkit.rollout": {"rlkit.kernels"},  # kernels.precision: the engine's auto dtype
    "rlkit.rewards": {"rlkit.rollout"},
    "rlkit.envs": {"rlkit.rewards"},
    "rlkit.recipe": set(),
    "rlkit.data": {"rlkit.recipe", "rlkit.rewards", "rlkit.envs"},
    "rlkit.training": {"rlkit.recipe", "rlkit.kernels"},
    "rlkit.runtime": {"rlkit.recipe", "rlkit.training"} | _LEAF_PACKAGES,
    "rlkit.algorithms": {"rlkit.recipe", "rlkit.data", "rlkit.training", "rlkit.runtime"} | _LEAF_PACKAGES,
    "rlkit.orchestration": {"rlkit.recipe", "rlkit.data", "rlkit.training", "rlkit.runtime",
                            "rlkit.algorithms"} | _LEAF_PACKAGES,
    "rlkit": {"rlkit.recipe", "rlkit.data", "rlkit.training", "rlkit.runtime", "rlkit.algorithms",
              "rlkit.orchestration"} | _LEAF_PACKAGES,
}
# rewards/_harness.py is the program a sandbox runs (passed with -c): importing it would run it. Its source is checked.
NOT_IMPORTABLE = {"rlkit.rewards._harness"}


def source_files() -> dict[str, Path]:
    """Every module of the installed package by its import name: rlkit/**, and the leaf folders as rlkit.<leaf>."""
    files = {}
    for path in sorted((ROOT / "rlkit").rglob("*.py")):
        files[_name(("rlkit",) + path.relative_to(ROOT / "rlkit").with_suffix("").parts)] = path
    for leaf in LEAVES:
        for path in sorted((ROOT / leaf).rglob("*.py")):
            files[_name(("rlkit", leaf) + path.relative_to(ROOT / leaf).with_suffix("").parts)] = path
    return files


def _name(parts: tuple[str, ...]) -> str:
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = source_files()


def package_of(module: str) -> str:
    """The layer a module belongs to: the longest package of ALLOWED that holds it."""
    return max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)


def imported_modules(source: str, examples: bool = True) -> set[str]:
    """Every module an import statement names, at any depth of the code (and of a `>>>` example, with `examples`);
    `from a import b` names a.b where that is a module."""
    trees = [ast.parse(source)]
    for example in doctest.DocTestParser().get_examples(source) if examples else ():
        try:
            trees.append(ast.parse(example.source))
        except SyntaxError:  # an example continued over several `>>>` lines: the test of its own module runs it
            pass
    names = set()
    for node in (node for tree in trees for node in ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & FILES.keys()
            names |= submodules or {node.module}
    return names


def test_the_layers_cover_every_module():
    assert {"rlkit.recipe.config", "rlkit.training.batches", "rlkit.runtime.cluster", "rlkit.algorithms.grpo",
            "rlkit.orchestration.runner", "rlkit.run", "rlkit.rewards.scorer", "rlkit.kernels.logprobs",
            "rlkit.envs.tools", "rlkit.rollout.vllm_engine"} <= FILES.keys()
    for name, path in FILES.items():
        if path.name == "__init__.py" and name != "rlkit":
            assert ast.get_docstring(ast.parse(path.read_text())), f"{path}: say what lives there, what it imports"


@pytest.mark.parametrize("module", sorted(FILES))
def test_imports_go_down_the_layers(module):
    own = package_of(module)
    rlkit_imports = {m for m in imported_modules(FILES[module].read_text()) if m == "rlkit" or m.startswith("rlkit.")}
    climbing = sorted(m for m in rlkit_imports if package_of(m) != own and package_of(m) not in ALLOWED[own])
    assert not climbing, f"{module} ({own}) imports {climbing}; {own} may import only {sorted(ALLOWED[own])}"


@pytest.mark.parametrize("path", sorted(p for d in ("rlkit", "tests", "bench", *LEAVES) for p in (ROOT / d).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_imports_a_borrowed_top_level_name(path):
    borrowed = sorted(m for m in imported_modules(path.read_text()) if m.split(".")[0] in LEAVES)
    assert not borrowed, f"{path.relative_to(ROOT)} imports {borrowed}; import them as rlkit.<name>"


def test_no_import_cycle():
    graph = {name: {m for m in imported_modules(path.read_text(), examples=False) if m in FILES}
             for name, path in FILES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_type_checking_imports():
    """A `TYPE_CHECKING` import is how a cycle is dodged; the types live below whoever needs them instead."""
    dodging = sorted(str(p.relative_to(ROOT)) for p in FILES.values() if "TYPE_CHECKING" in p.read_text())
    assert not dodging


def test_the_cycle_check_sees_a_cycle_and_local_imports():
    source = 'def f():\n    from rlkit.recipe.config import RecipeConfig\n\n"""\n>>> import rlkit.training\n"""\n'
    assert imported_modules(source) == {"rlkit.recipe.config", "rlkit.training"}
    assert imported_modules(source, examples=False) == {"rlkit.recipe.config"}
    assert imported_modules("from rlkit.algorithms import sft, STAGES") == {"rlkit.algorithms.sft"}


def test_the_distribution_claims_only_rlkit():
    """pyproject.toml installs every package under `rlkit.`: the leaf folders through package-dir."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "rlkit" or p.startswith("rlkit.") for p in setuptools["packages"])
    assert setuptools["package-dir"] == {f"rlkit.{leaf}": leaf for leaf in LEAVES}
    packages = {_name(("rlkit",) + p.relative_to(ROOT / "rlkit").with_suffix("").parts) for p in (ROOT / "rlkit").rglob("__init__.py")
                if "__pycache__" not in p.parts}
    assert set(setuptools["packages"]) == packages | _LEAF_PACKAGES | {"rlkit"}


# Run in a fresh interpreter from a folder that holds stand-ins for other distributions' packages named kernels,
# rewards, rollout and envs (Hugging Face's `kernels` is one), first on sys.path: both they and rlkit's must import.
STANDIN_PROBE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
for name in ("kernels", "rewards", "rollout", "envs"):
    assert importlib.import_module(name).STANDIN == name, name
found = {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:  # an optional dependency of a GPU path (triton) that this machine lacks
        if e.name.split(".")[0] in ("rlkit", "kernels", "rewards", "rollout", "envs"):
            raise
        continue
    found[name] = sorted(m for m in sys.modules if m.startswith("rlkit.") and m.split(".")[1] not in
                         ("kernels", "rollout", "rewards", "envs"))
import rlkit.kernels
print(json.dumps({
    "loaded": found,
    "standins": {n: getattr(sys.modules[n], "STANDIN", None) for n in ("kernels", "rewards", "rollout", "envs")},
    "foreign": sorted(m for m in sys.modules if m.split(".")[0] in ("kernels", "rewards", "rollout", "envs")
                      and "." in m),
    "rlkit.kernels": rlkit.kernels.__file__, "fused_logprobs": hasattr(rlkit.kernels, "fused_logprobs"),
}))
"""


@pytest.fixture(scope="module")
def standin_probe(tmp_path_factory) -> dict:
    """The leaves' modules, then the library's main modules, imported beside the stand-ins."""
    folder = tmp_path_factory.mktemp("site")
    for name in LEAVES:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"STANDIN = {name!r}\n")
    leaves = [n for n in FILES if package_of(n) in _LEAF_PACKAGES and n not in NOT_IMPORTABLE]
    library = ["rlkit.recipe", "rlkit.data.prepare", "rlkit.training.trainer", "rlkit.training.critic",
               "rlkit.training.reference", "rlkit.runtime.cluster", "rlkit.algorithms.common",
               "rlkit.algorithms.grpo", "rlkit.algorithms.ppo", "rlkit.orchestration.runner"]
    done = subprocess.run([sys.executable, "-c", STANDIN_PROBE, str(folder), *leaves, *library], cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"leaves": leaves}


def test_other_distributions_packages_and_rlkits_both_import(standin_probe):
    assert standin_probe["standins"] == {n: n for n in LEAVES}  # still the stand-ins after all of rlkit loaded
    assert standin_probe["foreign"] == []  # nothing of rlkit came in under a bare leaf name
    assert Path(standin_probe["rlkit.kernels"]) == ROOT / "kernels" / "__init__.py"
    assert standin_probe["fused_logprobs"]


def test_importing_a_leaf_loads_nothing_of_rlkits_layers(standin_probe):
    loaded = standin_probe["loaded"]
    assert {"rlkit.rewards.scorer", "rlkit.rewards.judge", "rlkit.rollout.vllm_engine", "rlkit.kernels.logprobs",
            "rlkit.envs.tools"} <= loaded.keys()
    pulled = {name: modules for name, modules in loaded.items() if name in standin_probe["leaves"] and modules}
    assert not pulled, f"leaf modules that load rlkit's layers: {pulled}"
