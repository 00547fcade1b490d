"""`python -m rlkit.report RUN_DIR`: PNG plots of a run's metrics and a short Markdown summary.

Reads RUN_DIR/metrics.jsonl (and summary.json when the run finished); writes RUN_DIR/report/*.png and
RUN_DIR/report/summary.md. Works on a run that is still going or was cut off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (figure file, title, metric-name suffixes to plot on it); a suffix matches "<stage>/<suffix>" keys.
PANELS = [
    ("reward.png", "reward (mean per step)", ["reward/mean"]),
    ("accuracy.png", "held-out accuracy", ["eval/accuracy"]),
    ("kl.png", "KL to reference and engine/trainer mismatch", ["kl", "rollout_kl"]),
    ("length.png", "response length", ["response_length/mean", "response_length/max"]),
    ("loss.png", "training loss", ["loss"]),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"RUN_DIR: '{run_dir}' has no metrics.jsonl; expected a folder written by rlkit.run")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write can leave a torn last line; anything else is a real problem.
            if lineno != len(path.read_text().splitlines()):
                raise ValueError(f"{path}:{lineno} is not valid JSON") from None
    return rows


def series(rows: list[dict], suffix: str) -> dict[str, tuple[list[int], list[float]]]:
    """{full metric name: (steps, values)} for every key equal to `suffix` or ending in '/<suffix>'."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and (key == suffix or key.endswith("/" + suffix)) and isinstance(value, (int, float)):
                if suffix == "kl" and key.endswith("rollout_kl"):
                    continue
                steps, values = out.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(float(value))
    return out


def plot(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    written = []
    for filename, title, suffixes in PANELS:
        lines = {k: v for s in suffixes for k, v in series(rows, s).items()}
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, (steps, values) in sorted(lines.items()):
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=100)
        plt.close(fig)
        written.append(out_dir / filename)
    return written


def summarize(run_dir: Path) -> str:
    lines = [f"# Run {run_dir.name}", ""]
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        lines += ["| stage | kind | accuracy before | accuracy after | seconds |", "|---|---|---|---|---|"]
        for s in summary["stages"]:
            lines.append(
                f"| {s['name']} | {s['kind']} | {s['before']['accuracy']:.3f} | {s['after']['accuracy']:.3f} "
                f"| {s['seconds']:.0f} |"
            )
        lines += ["", f"Total: {summary.get('seconds', float('nan')):.0f} s."]
    else:
        lines.append("The run has not finished (no summary.json); plots show the steps logged so far.")
    rows = read_metrics(run_dir)
    lines += ["", f"{len(rows)} metric rows, last global step {rows[-1]['step'] if rows else 0}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlkit.report", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        written = plot(args.run_dir)
        text = summarize(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (args.run_dir / "report" / "summary.md").write_text(text)
    print(text)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
