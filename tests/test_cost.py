"""The step-cost fit and the finish-time prediction behind admission control, as pure functions."""

from __future__ import annotations

import pytest

from service.cost import Cost, CostMeter, network_rows, predict, retry_after_s


def test_the_meter_recovers_fixed_and_marginal_cost_from_calls_of_several_sizes():
    meter = CostMeter(budget=8)
    assert meter.cost() is None  # nothing measured: nothing predicted
    for units in (1, 2, 4, 8, 3, 6):
        meter.call(units, 0.010 + 0.005 * units)
    meter.job(40)
    meter.job(20)
    cost = meter.cost()
    assert cost.call_s == pytest.approx(0.010) and cost.unit_s == pytest.approx(0.005)
    assert cost.job_units == 30 and cost.budget == 8
    assert Cost.from_json(cost.to_json()) == cost


def test_calls_of_one_size_count_as_marginal_cost():
    meter = CostMeter(budget=4)
    for _ in range(3):
        meter.call(4, 0.2)
    meter.job(10)
    cost = meter.cost()
    assert cost.call_s == 0 and cost.unit_s == pytest.approx(0.05) and cost.job_units == 10


def test_prediction_is_the_queue_drained_at_full_capacity_plus_its_own_calls():
    cost = Cost(call_s=0.01, unit_s=0.005, budget=8, job_units=40)  # a full call: 0.05 s for 8 units
    assert predict([], 10, 2, 20) is None
    alone = predict([cost], 0, 2, 20)
    assert alone.drain_s == 0 and alone.own_s == pytest.approx(20 * 0.02)
    behind = predict([cost], 10, 2, 20)  # 400 units ahead at 160 units/s
    assert behind.drain_s == pytest.approx(2.5) and behind.finish_s == pytest.approx(2.9)
    two = predict([cost, cost], 10, 2, 20)  # two workers drain twice as fast
    assert two.drain_s == pytest.approx(1.25)
    assert retry_after_s(behind, 1.0) == 2 and retry_after_s(alone, 60) == 1


def test_network_rows_count_the_guidance_half():
    assert network_rows(2, "cfg", 4.0) == 4
    assert network_rows(2, "cfg", 1.0) == 2 and network_rows(3, "none", 7.0) == 3
