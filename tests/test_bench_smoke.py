"""Smoke run of the turbo benchmark on tiny stand-ins (the real run writes a report; CI only
checks that the script runs end to end and reports what it promises)."""

from __future__ import annotations

import json
import subprocess
import sys

from service.config import ROOT


def test_turbo_benchmark_runs_and_reports_speedups(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.turbo", "--out", str(tmp_path / "report"), "--teacher", "tiny-mmdit",
         "--turbo", "tiny-mmdit-turbo-none", "--quick", "--repeats", "1", "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["shipped"]["tiny-mmdit"]["batch_8"]["images_per_s"] > 0
    assert {"encode_s", "denoise_s", "decode_s"} <= set(report["shipped"]["tiny-mmdit"]["batch_1"])
    assert report["stand_in"]["batch_1"]["speedup"] > 1  # 4 unguided calls against 40
    assert "note" in report["shipped"]["tiny-mmdit-turbo-none"]  # timed on the teacher's weights


def test_free_init_benchmark_runs_and_reports_each_pass_count(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.free_init", "--model", "tiny-video", "--frames", "4", "--steps", "2",
         "--repeats", "2", "--out", str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["median_s"]) == {"1", "2"} and all(len(ts) == 2 for ts in report["runs_s"].values())
    assert report["ratio_to_one_pass"]["1"] == 1.0 and report["cpu"]["model"]
