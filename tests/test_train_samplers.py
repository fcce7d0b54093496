"""Domain samplers and per-domain infinite samplers: sequences, probabilities, state round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from uniret.train.samplers import DynamicSampler, InfiniteIndexSampler, make_domain_sampler


def test_infinite_sampler_reshuffles_each_pass_and_resumes():
    s = InfiniteIndexSampler(5, seed=0, key=1)
    first = s.take(5)
    second = s.take(5)
    assert sorted(first) == list(range(5)) and sorted(second) == list(range(5))
    assert first != second  # a new permutation each pass (holds for this seed)
    s.take(3)
    state = s.state_dict()
    expected = s.take(9)  # crosses a pass boundary
    t = InfiniteIndexSampler(5, seed=0, key=1)
    t.load_state_dict(state)
    assert t.take(9) == expected


def test_round_robin_and_size():
    rr = make_domain_sampler("round_robin", [10, 20, 30], seed=0)
    assert [rr.next_domain() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    size = make_domain_sampler("size", [10, 30], seed=0)
    assert size.probabilities() == pytest.approx([0.25, 0.75])
    draws = np.array([size.next_domain() for _ in range(4000)])
    assert (draws == 1).mean() == pytest.approx(0.75, abs=0.03)


def drive(sampler: DynamicSampler, losses: dict[int, float], steps: int, events: list | None = None) -> list[int]:
    domains = []
    for _ in range(steps):
        d = sampler.next_domain()
        event = sampler.record(d, losses[d])
        if event is not None and events is not None:
            events.append(event)
        domains.append(d)
    return domains


def test_dynamic_probabilities_follow_recorded_losses():
    s = DynamicSampler([100, 100, 100], seed=0, interval=6, window=6)
    events = []
    first = drive(s, {0: 3.0, 1: 2.0, 2: 1.0}, 5, events)
    assert first == [0, 1, 2, 0, 1] and not events  # round-robin until the first update
    assert s.probabilities() == pytest.approx([1 / 3] * 3)
    drive(s, {0: 3.0, 1: 2.0, 2: 1.0}, 1, events)  # the 6th loss: p = Lbar_i / sum_j Lbar_j = [3, 2, 1] / 6
    assert s.probabilities() == pytest.approx([0.5, 1 / 3, 1 / 6])
    assert len(events) == 1 and events[0]["step"] == 6  # reported: step 6 is the first drawn from it
    assert events[0]["window_means"] == pytest.approx([3.0, 2.0, 1.0])
    assert events[0]["probabilities"] == pytest.approx([0.5, 1 / 3, 1 / 6])
    draws = np.array(drive(s, {0: 3.0, 1: 2.0, 2: 1.0}, 5, events))  # still inside the interval
    assert len(draws) == 5 and len(events) == 1
    # many steps with constant losses: frequencies approach p
    big = DynamicSampler([1, 1, 1], seed=1, interval=3, window=3000)
    draws = np.array(drive(big, {0: 3.0, 1: 2.0, 2: 1.0}, 6000))
    freq = np.bincount(draws[3:], minlength=3) / len(draws[3:])
    assert freq == pytest.approx([0.5, 1 / 3, 1 / 6], abs=0.03)


def test_dynamic_window_forgets_old_losses():
    s = DynamicSampler([1, 1], seed=0, interval=4, window=4)
    events = []
    drive(s, {0: 10.0, 1: 10.0}, 4, events)  # steps 0..3, then the update for step 4
    assert s.probabilities() == pytest.approx([0.5, 0.5]) and len(events) == 1
    s.next_domain()
    s.record(0, 1.0)
    for _ in range(3):
        d = s.next_domain()
        event = s.record(d, 1.0 if d == 0 else 3.0)  # the last one: update for step 8 from steps 4..7
    means = event["window_means"]
    assert means[0] == pytest.approx(1.0)
    # domain 1 either was drawn (loss 3) or keeps its last mean (10)
    assert means[1] in (pytest.approx(3.0), pytest.approx(10.0))
    assert s.probabilities()[0] == pytest.approx(means[0] / (means[0] + means[1]))


def test_dynamic_state_round_trip_continues_identically():
    losses = {0: 2.0, 1: 1.0, 2: 0.5}
    a = DynamicSampler([5, 5, 5], seed=3, interval=5, window=5)
    drive(a, losses, 12)
    state = a.state_dict()
    rest = drive(a, losses, 20)
    b = DynamicSampler([5, 5, 5], seed=3, interval=5, window=5)
    b.load_state_dict(state)
    assert drive(b, losses, 20) == rest
