"""Resume points: what a run needs to continue after a crash or a kill, written atomically.

A resume point is a folder `checkpoints/resume/step_<global step>` holding
- `state.json`: the controller's `RunState` (stage, step, global step, metrics so far, best value, W&B run id);
- `controller.pt`: the controller's RNG states and the stage's own extra state (e.g. DPO's pairs);
- `policy/` (and `critic/` for PPO): each trainer group's weights and optimizer as torch.distributed.checkpoint
  shards (`dcp/`, one file per rank, nothing gathered), and per rank its schedule and RNG (rlkit.rank).

The run folder is on storage every node sees (rlkit.placement checks it at start). The driver writes the point
under a `.tmp` name and renames it only after every rank has returned from writing and it sees each rank's files;
`latest` names the newest complete point and is itself replaced atomically. A crash mid-write leaves the previous
point intact; older points beyond `checkpoint.keep` are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESUME_DIR = Path("checkpoints") / "resume"


@dataclass
class RunState:
    """Where a run stands. Between stages `step` is 0 and `model_path` is the next stage's starting point."""

    stage: int = 0  # the stage in progress, or the next to start
    step: int = 0  # steps of that stage already done
    global_step: int = 0  # the logger's step, continuous across stages
    model_path: str = ""  # the checkpoint the stage starts from
    before: dict = field(default_factory=dict)  # held-out metrics before the stage
    summary: dict = field(default_factory=lambda: {"stages": []})  # finished stages
    best: dict = field(default_factory=dict)  # {"value": best held-out logging.best_metric so far}
    wandb_id: str = ""
    seconds: float = 0.0  # wall time of the run before this process started


@dataclass
class ResumePoint:
    path: Path
    state: RunState

    def extra(self) -> dict[str, Any]:
        return torch.load(self.path / "controller.pt", weights_only=False)["extra"]

    def restore_rng(self) -> None:
        _set_rng(torch.load(self.path / "controller.pt", weights_only=False)["rng"])


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int):
        self.root, self.keep = Path(run_dir) / RESUME_DIR, keep

    def latest(self) -> ResumePoint | None:
        """The newest complete resume point, or None when the run has none."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        state_file = path / "state.json"
        if not state_file.exists():
            raise RuntimeError(f"{pointer} names '{path.name}', which has no state.json; the run folder was edited")
        return ResumePoint(path, RunState(**json.loads(state_file.read_text())))

    def save(self, state: RunState, groups: dict[str, Any] | None = None, extra: dict | None = None) -> Path:
        """Write a resume point for `state`; `groups` are trainer groups by name (their state goes in subfolders)."""
        name = f"step_{state.global_step:07d}" + ("" if groups else "_stage")
        final, tmp = self.root / name, self.root / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for group_name, group in (groups or {}).items():  # returns once every rank has written
            check_written(tmp / group_name, group.save_state(str(tmp / group_name)))
        torch.save({"rng": _get_rng(), "extra": extra or {}}, tmp / "controller.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
        if final.exists():  # the same step written again (a resumed run passing the same point)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(self.root / "latest", name)
        self._prune()
        return final

    def _prune(self) -> None:
        points = sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        complete = [p for p in points if not p.name.endswith(".tmp")]
        for old in complete[: -self.keep]:
            shutil.rmtree(old)
        for partial in (p for p in points if p.name.endswith(".tmp")):  # left by a crash mid-write
            shutil.rmtree(partial)


def check_written(folder: Path, names: list[str]) -> None:
    """Refuse to commit a resume point whose ranks wrote files this process does not see (a rank on a node
    whose `folder` is another disk): resuming from it would fail, or silently load old state."""
    missing = [name for name in names if not (folder / name).exists()]
    if missing:
        raise RuntimeError(f"resume point: {', '.join(missing)} written by the trainer ranks are not in {folder} "
                           "on the driver's node; logging.output_dir must be storage every node sees")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _get_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def split_metrics(path: Path, global_step: int) -> int:
    """Keep in `path` (metrics.jsonl) the records up to `global_step`; move later ones, logged after the resume
    point by the run that died, to `metrics.orphaned.jsonl` beside it. Returns how many moved."""
    if not path.exists():
        return 0
    keep, orphaned = [], []
    for line in path.read_text().splitlines():
        try:
            late = json.loads(line).get("step", 0) > global_step
        except json.JSONDecodeError:  # a line cut short by the kill
            late = True
        (orphaned if late else keep).append(line)
    if orphaned:
        with open(path.with_name("metrics.orphaned.jsonl"), "a") as f:
            f.write("\n".join(orphaned) + "\n")
        _write_atomic(path, "".join(line + "\n" for line in keep))
    return len(orphaned)
