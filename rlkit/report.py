"""`python -m rlkit.report RUN_DIR`: PNG plots of a run's metrics and a short Markdown summary.

Reads RUN_DIR/metrics.jsonl (and summary.json when the run finished); writes RUN_DIR/report/*.png and
RUN_DIR/report/summary.md. Works on a run that is still going or was cut off. A stage with gold rewards
(`reward.gold`) also gets report/gold_<stage>.png: its proxy and gold reward against KL from the stage's start.
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
    ("gold.png", "proxy and gold reward per step (reward.gold)", ["gold/proxy_mean", "gold/mean"]),
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


def gold_curves(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per stage with a gold monitor (reward.gold): the steps where it logged proxy and gold means beside the KL to
    the stage's start (its reference model, `<stage>/kl`), as {stage: {"kl", "proxy", "gold"}} in step order."""
    out: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for key in row:
            if not key.endswith("/gold/proxy_mean"):
                continue
            stage = key[: -len("/gold/proxy_mean")]
            values = [row.get(f"{stage}/{k}") for k in ("kl", "gold/proxy_mean", "gold/mean")]
            if all(isinstance(v, (int, float)) for v in values):
                curve = out.setdefault(stage, {"kl": [], "proxy": [], "gold": []})
                for name, value in zip(("kl", "proxy", "gold"), values):
                    curve[name].append(float(value))
    return out


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and up to window - 1 before it.

    >>> rolling_mean([1.0, 3.0, 5.0, 7.0], 2)
    [1.0, 2.0, 4.0, 6.0]
    """
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def plot_gold(rows: list[dict], out_dir: Path, plt) -> list[Path]:
    """gold_<stage>.png: proxy (left axis) and gold (right axis) reward against KL from the stage's start, Gao et
    al. 2022's over-optimisation picture. Points are the logged steps (logging.log_every); lines their rolling means
    over a tenth of them (each point itself when fewer than 20 were logged)."""
    written = []
    for stage, curve in sorted(gold_curves(rows).items()):
        fig, ax = plt.subplots(figsize=(7, 4))
        gold_ax = ax.twinx()  # a reward model's scale is its own: each reward on its own axis
        window = max(1, len(curve["kl"]) // 10)
        kl = rolling_mean(curve["kl"], window)
        for axis, name, color in ((ax, "proxy", "tab:blue"), (gold_ax, "gold", "tab:orange")):
            axis.scatter(curve["kl"], curve[name], s=6, alpha=0.3, color=color)
            label = name if window == 1 else f"{name} (mean of {window} logged steps)"
            axis.plot(kl, rolling_mean(curve[name], window), color=color, marker="o" if window == 1 else None,
                      markersize=3, label=label)
            axis.set_ylabel(f"{name} reward", color=color)
        ax.set_xlabel(f"KL to the stage's start ({stage}/kl, per token)")
        ax.set_title(f"{stage}: proxy vs gold reward against KL (over-optimisation)")
        ax.grid(alpha=0.3)
        fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.88), fontsize=8)
        fig.tight_layout()
        path = out_dir / f"gold_{stage.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


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
    return written + plot_gold(rows, out_dir, plt)


def summarize(run_dir: Path) -> str:
    lines = [f"# Run {run_dir.name}", ""]
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        gold = any("gold/accuracy" in s["after"] for s in summary["stages"])  # reward.gold: the verifier's view
        head = "| stage | kind | accuracy before | accuracy after |" + (" gold accuracy after |" if gold else "")
        lines += [head + " seconds |", "|---" * (5 + gold) + "|"]
        for s in summary["stages"]:
            cells = [s["name"], s["kind"], f"{s['before']['accuracy']:.3f}", f"{s['after']['accuracy']:.3f}"]
            cells += [f"{s['after'].get('gold/accuracy', float('nan')):.3f}"] if gold else []
            stopped = f" (stopped at step {s['stopped_at_step']})" if "stopped_at_step" in s else ""
            lines.append("| " + " | ".join(cells + [f"{s['seconds']:.0f}{stopped}"]) + " |")
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
