import json

from rlkit.report import gold_curves, main, series


def write_run(tmp_path, torn_tail=False):
    rows = [{"step": 0, "eval/accuracy": 0.1}]
    rows += [{"step": s, "grpo/reward/mean": s / 10, "grpo/kl": 0.01 * s, "grpo/rollout_kl": 0.0} for s in range(1, 6)]
    rows += [{"step": 5, "eval/accuracy": 0.4}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    if torn_tail:
        text += '{"step": 6, "grpo/rew'
    (tmp_path / "metrics.jsonl").write_text(text)


def test_series_matches_stage_prefixed_keys_and_keeps_kinds_apart(tmp_path):
    write_run(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert series(rows, "reward/mean")["grpo/reward/mean"] == ([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert set(series(rows, "kl")) == {"grpo/kl"}  # rollout_kl is its own line
    assert series(rows, "eval/accuracy")["eval/accuracy"][1] == [0.1, 0.4]


def test_report_writes_pngs_and_summary_even_for_a_cut_off_run(tmp_path, capsys):
    write_run(tmp_path, torn_tail=True)
    assert main([str(tmp_path)]) == 0
    for name in ("reward.png", "accuracy.png", "kl.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "has not finished" in (tmp_path / "report" / "summary.md").read_text()


def test_report_on_a_folder_without_metrics(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_a_gold_monitored_stage_gets_its_proxy_vs_gold_against_kl_plot(tmp_path, capsys):
    rows = [{"step": s, "grpo/kl": 0.01 * s, "grpo/gold/proxy_mean": 0.1 * s, "grpo/gold/mean": 0.5 - 0.01 * s}
            for s in range(1, 6)]
    rows.insert(2, {"step": 2, "eval/accuracy": 0.3})  # rows without the three keys are skipped
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curves = gold_curves(rows)
    assert list(curves) == ["grpo"] and curves["grpo"]["kl"] == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert curves["grpo"]["gold"][-1] == 0.45
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report" / "gold_grpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report" / "gold.png").is_file()
    stage = {"name": "01_grpo", "kind": "grpo", "before": {"accuracy": 0.3}, "seconds": 12.4, "stopped_at_step": 4,
             "after": {"accuracy": 0.2, "gold/accuracy": 0.25}}
    (tmp_path / "summary.json").write_text(json.dumps({"stages": [stage], "seconds": 20}))
    assert main([str(tmp_path)]) == 0
    assert "| 01_grpo | grpo | 0.300 | 0.200 | 0.250 | 12 (stopped at step 4) |" in capsys.readouterr().out
