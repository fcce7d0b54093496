"""What the terminal shows: metric and score formatting, and progress on a non-terminal stderr."""

from __future__ import annotations

import pytest

from uniret import utils
from uniret.display import display_score, format_metric, render_table


def test_scores_are_clipped_and_metrics_have_fixed_decimals():
    assert display_score(1.0001) == 1.0 and display_score(-1.2) == -1.0 and display_score(0.12345678) == 0.123457
    assert format_metric(0.61) == "0.6100" and format_metric(None) == "-"
    table = render_table([{"name": "a", "R@1": 0.61, "n": 3}, {"name": "b", "R@1": 1.0, "n": 12}],
                         ["name", "R@1", "n"], metrics=["R@1"])
    assert table.splitlines()[2:] == ["a     0.6100   3", "b     1.0000  12"]


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_progress_on_a_pipe_is_plain_lines(monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(utils.time, "monotonic", clock)
    with utils.progress_bar("embedding", 200) as advance:  # stderr is captured: not a terminal
        advance(20)  # a resumed job's head start: not counted in the rate
        for _ in range(180):
            clock.t += 0.5
            advance(1, info="loss 1.0")
    lines = capsys.readouterr().err.splitlines()
    # 5% of 200 = 10 items = 5 s: a line at each further 5% (at most every 10 s, at least every 1 s)
    assert lines[0] == "embedding: 30/200 (15%), 2.0/s, about 85 s left (loss 1.0)"
    assert lines[1] == "embedding: 40/200 (20%), 2.0/s, about 80 s left (loss 1.0)"
    assert len(lines) == 18 + 1
    assert lines[-1] == "embedding: 200 done in 90.0 s, 2.0/s (loss 1.0)"


def test_progress_without_total_and_after_an_error(monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(utils.time, "monotonic", clock)
    with utils.progress_bar("packing", None) as advance:
        for _ in range(30):
            clock.t += 1.0
            advance(4)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["packing: 40, 4.0/s", "packing: 80, 4.0/s"]  # every 10 s
    with pytest.raises(RuntimeError), utils.progress_bar("packing", 10) as advance:
        advance(1)
        raise RuntimeError("disk full")
    assert capsys.readouterr().err == ""  # no "done" line for a job that failed
