"""Tests of experiments/targeted/report.py: the printed margin and summary tables and the plot."""

import pytest

from experiments.targeted import report


def _margin_rows(n):
  return [
    {
      "target_class": i % 10,
      "base_class": (i + 1) % 10,
      "n_correct": 100 + i,
      "median_margin": float(i),
      "q10_margin": i / 2,
      "frac_under_2": 0.1,
    }
    for i in range(n)
  ]


def test_format_margins_shows_the_top_pairs_and_marks_the_chosen_one_even_below_them():
  rows = _margin_rows(12)
  text = report.format_margins(rows, chosen=(9, 0), top=3)
  lines = text.splitlines()
  assert len(lines) == 2 + 4  # header, rule, 3 top pairs, the chosen pair
  assert "9 -> 0 (chosen)" in lines[-1] and "boot -> T-shirt" in lines[-1]
  assert "(chosen)" not in "".join(lines[:-1])


def _summary(label, rate, multipoison=False):
  row = {
    "attack": "watermark",
    "label": label,
    "successes": int(rate * 40),
    "n": 40,
    "success_rate": rate,
    "ci_low": max(0.0, rate - 0.1),
    "ci_high": min(1.0, rate + 0.1),
    "control_successes": 3,
    "control_rate": 0.075,
    "control_ci_low": 0.03,
    "control_ci_high": 0.2,
    "net_successes": 1,
    "mean_attempts": 1.0,
    "mean_rad": 0.01,
    "initial_margin": 4.6,
    "margin_shift_first": -1.3,
    "margin_shift_best": -1.4,
    "clean_acc": 0.85,
    "utility_rad": 0.0,
  }
  if multipoison:
    row |= {"mean_poisons": 3.8, "std_poisons": 2.9}
  return row


@pytest.mark.parametrize("mode", ["oneshot", "multipoison"])
def test_format_summary_gives_counts_intervals_and_poisons_needed_in_multipoison(mode):
  text = report.format_summary([_summary("vanilla", 0.35, mode == "multipoison")], mode)
  assert "14/40 = 0.35 [0.25, 0.45]" in text
  assert "3/40 [0.03, 0.20]" in text
  assert ("poisons needed" in text) == (mode == "multipoison")


def test_plot_summary_writes_a_png(tmp_path):
  panels = [("MLP", [_summary("vanilla", 0.35, True), _summary("clip C=1", 0.0, True)])]
  path = tmp_path / "targeted.png"
  report.plot_summary(str(path), panels, multipoison=True)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
