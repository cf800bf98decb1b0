"""Smoke run of the open-loop load test (the real run writes a committed report; CI only
checks that it runs end to end against its three servers and reports what it promises)."""

from __future__ import annotations

import json
import subprocess
import sys

from service.config import ROOT


def test_open_loop_load_test_runs_three_servers_and_reports_goals_and_plots(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loadtests.openloop", "--out", str(tmp_path), "--duration", "2",
                             "--rates", "0.5", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["configs"]) == {"step-level", "whole-request", "one-at-a-time"}
    for cfg in report["configs"].values():
        assert cfg["closed_16"]["succeeded"] > 0 and cfg["lone"]["end_to_end_s"] > 0
        assert all(r["succeeded"] == r["sent"] > 0 for r in cfg["open"])  # every open-loop request finished
    assert {"step_vs_whole_at_equal_p99", "step_vs_one_at_a_time_16_clients"} <= set(report["goals"])
    assert (tmp_path / "latency.png").stat().st_size > 1000 and (tmp_path / "report.md").exists()


def test_the_locust_file_drives_a_running_service(api, worker, tmp_path):
    """The users' locust file, headless for a few seconds against the test service."""
    import csv

    result = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--host", str(api.base_url),
                             "--headless", "-u", "2", "-r", "2", "-t", "4s", "--ls-model", "tiny-mmdit",
                             "--csv", str(tmp_path / "run"), "--only-summary", "--exit-code-on-error", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "run_stats.csv"))}
    assert int(rows["tiny-mmdit"]["Request Count"]) > 0 and rows["tiny-mmdit"]["Failure Count"] == "0", rows
    assert int(rows["tiny-mmdit queue"]["Request Count"]) == int(rows["tiny-mmdit"]["Request Count"])
