"""Run tracking: a local JSONL metrics file, Weights & Biases (offline by default) and a console progress bar.

Every metric goes to all sinks with one global step that keeps counting across stages, so the stages of a
recipe read as one continuous run in W&B.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlkit.recipe import LoggingConfig

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, recipe: dict[str, Any], resume_id: str = ""):
        """`resume_id`: the W&B run id of the run being resumed, so its curves continue in the same run."""
        self.cfg, self.run_dir = cfg, run_dir
        self.global_step = 0
        self._metrics = (run_dir / "metrics.jsonl").open("a")
        self._wandb = None
        if cfg.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                name=run_dir.name,
                dir=str(run_dir),
                mode=cfg.wandb_mode,
                config=recipe,
                reinit="finish_previous",
                id=resume_id or None,
                resume="allow" if resume_id else None,
            )

    @property
    def run_id(self) -> str:
        """The W&B run id ("" with W&B disabled)."""
        return self._wandb.id if self._wandb is not None else ""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record `metrics` at `step` (default: the current global step)."""
        step = self.global_step if step is None else step
        clean = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
        self._metrics.write(json.dumps({"step": step, **{k: _json_safe(v) for k, v in clean.items()}}) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def table(self, name: str, rows: list[dict[str, Any]]) -> None:
        """A table of rows (same keys) at the current global step: appended to completions.jsonl as
        {"step", "table", **row} records, and logged to W&B as a wandb.Table under `name`."""
        if not rows:
            return
        with open(self.run_dir / "completions.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"step": self.global_step, "table": name, **row}) + "\n")
        if self._wandb is not None:
            import wandb

            columns = list(rows[0])
            self._wandb.log({name: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                            step=self.global_step)

    def progress(self, total: int, desc: str, initial: int = 0) -> tqdm:
        """A progress bar with rate and ETA; `set_postfix` shows the latest metrics."""
        return tqdm(total=total, desc=desc, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON; they become null so the file stays readable by any parser."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
