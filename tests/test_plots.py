"""Plots beside reports: calibration numbers against hand-derived values, and real PNG files."""

from __future__ import annotations

import json
import math

import pytest

from arbiter.training import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_calibration_by_hand():
    # Every margin 2: sigmoid(2) = 0.8808 is claimed for "chosen wins" (always true) and 0.1192 for the mirrored
    # "rejected wins" (always false): both bins are off by 1 - sigmoid(2), so ECE = 0.1192.
    rows, ece = plots.calibration([2.0] * 10)
    assert ece == pytest.approx(1 - 1 / (1 + math.exp(-2)), abs=1e-12)
    assert [r["count"] for r in rows] == [10, 10] and [r["frequency"] for r in rows] == [0.0, 1.0]
    # Margins of 0 claim 0.5 and are right half the time (counted both ways): perfectly calibrated.
    assert plots.calibration([0.0] * 7)[1] == pytest.approx(0.0, abs=1e-12)
    # A confidently wrong head: margin -3 on every pair -> "chosen wins" is claimed at 0.047 and always true,
    # the mirror claimed at 0.953 and never true: both off by sigmoid(3).
    assert plots.calibration([-3.0] * 4)[1] == pytest.approx(1 / (1 + math.exp(-3)), abs=1e-12)


def test_plots_write_pngs(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 0.7, "rewards/accuracies": 0.5, "rewards/margins": 0.0},
        {"step": 2, "loss": 0.6, "rewards/accuracies": 0.6, "rewards/margins": 0.1, "eval_loss": 0.65,
         "eval_rewards/accuracies": 0.55, "eval_rewards/margins": 0.05},
        {"final": {"train_accuracy": 0.6}},
    ]) + "\n")
    out = plots.training_curves(log, tmp_path / "curves.png", "t")
    assert out.read_bytes()[:8] == PNG
    assert plots.reward_histograms([1, 2, 3], [0, 2.5, 1], tmp_path / "h.png").read_bytes()[:8] == PNG
    path, ece = plots.reliability_diagram([1.0, -0.5, 2.0], tmp_path / "r.png")
    assert path.read_bytes()[:8] == PNG and 0 <= ece <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "h.png", "log.jsonl", "r.png"]  # no temp files left
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plots.training_curves(empty, tmp_path / "none.png") is None
