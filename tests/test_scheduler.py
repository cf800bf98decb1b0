"""The step-level scheduler as pure functions (service.scheduler): no model, no Redis."""

from __future__ import annotations

from collections import Counter

import pytest

from service.scheduler import PRIORITIES, Entry, Scheduler


def entry(i, group="a", images=1, cost=None, priority="normal", deadline=None, model="m", offered=True) -> Entry:
    return Entry(str(i), model, (model, group), images, images if cost is None else cost, PRIORITIES[priority],
                 float(i), deadline, offered)


def run_steps(s: Scheduler, n: int, now: float = 0.0) -> list:
    ran = []
    for _ in range(n):
        group = s.schedule(now).run
        ran.append(group)
        if group is not None:
            s.stepped(group, s.cost(group))
    return ran


def test_rows_join_a_running_batch_at_the_next_step_boundary():
    s = Scheduler({"m": 4})
    s.add(entry(1))
    assert s.schedule(0).admit == ["1"]
    s.add(entry(2))  # arrives one step later
    d = s.schedule(0)
    assert d.admit == ["2"] and d.run == ("m", "a") and {e.id for e in s.running()} == {"1", "2"}


def test_whole_request_policy_admits_only_into_an_empty_batch():
    s = Scheduler({"m": 4}, policy="request")
    s.add(entry(1))
    assert s.schedule(0).admit == ["1"]
    assert s.free("m") == 0  # claims nothing while its batch runs
    s.add(entry(2))
    d = s.schedule(0)
    assert d.admit == [] and d.release == ["2"] and "2" not in s.entries
    s.remove("1")
    s.add(entry(3))
    assert s.schedule(0).admit == ["3"]


def test_the_budget_counts_images_and_a_job_larger_than_it_runs_alone():
    s = Scheduler({"m": 4})
    for e in (entry(1, images=3), entry(2, images=2), entry(3, images=1)):
        s.add(e)
    d = s.schedule(0)
    # 2 does not fit and nothing overtakes it: 3 goes back to the queue with it.
    assert d.admit == ["1"] and d.release == ["2", "3"]
    s.remove("1")
    s.add(entry(4, images=9))
    assert s.schedule(0).admit == ["4"] and s.used("m") == 9


def test_models_have_their_own_budgets():
    s = Scheduler({"a": 1, "b": 2})
    for e in (entry(1, model="a"), entry(2, model="a"), entry(3, model="b"), entry(4, model="b")):
        s.add(e)
    d = s.schedule(0)
    assert sorted(d.admit) == ["1", "3", "4"] and d.release == ["2"]


def test_a_job_past_its_deadline_is_evicted_whatever_its_state():
    s = Scheduler({"m": 1})
    s.add(entry(1, deadline=10.0))
    s.add(entry(2, deadline=5.0))
    assert s.schedule(0).admit == ["1"]
    s.add(entry(3, deadline=5.0))
    d = s.schedule(6.0)
    assert d.expire == ["3"] and "3" not in s.entries
    assert s.schedule(11.0).expire == ["1"] and s.idle()


def test_groups_share_the_engine_in_proportion_to_their_work_and_none_starves():
    """Deficit round robin over cost: a group of 4-row steps gets a quarter as many steps as a
    group of 1-row steps, i.e. the same number of network rows."""
    s = Scheduler({"m": 8})
    s.add(entry(1, group="big", images=4))
    s.add(entry(2, group="small", images=1))
    ran = Counter(run_steps(s, 100))
    assert ran[("m", "small")] == pytest.approx(4 * ran[("m", "big")], abs=4)
    assert ran[("m", "big")] >= 19  # never starved


def test_steps_costing_many_times_their_estimate_are_charged_and_still_scheduled():
    """An upscaler's tiled rows run one network row per window: a step's measured cost can
    be 9x its group's estimate. The scheduler keeps picking (it raised here before) and
    charges the real cost: the cheap group gets the engine 9x as often."""
    s = Scheduler({"m": 8})
    s.add(entry(1, group="tiled", images=1))
    assert s.schedule(0).run == ("m", "tiled")
    s.stepped(("m", "tiled"), 9)
    assert s.schedule(0).run == ("m", "tiled")  # alone: it runs again, whatever it owes
    s.add(entry(2, group="plain", images=1))
    ran = []
    for _ in range(100):
        group = s.schedule(0).run
        ran.append(group)
        s.stepped(group, 9 if group == ("m", "tiled") else 1)
    assert ran.count(("m", "plain")) == pytest.approx(9 * ran.count(("m", "tiled")), abs=9)


def test_equal_groups_alternate():
    s = Scheduler({"m": 8})
    s.add(entry(1, group="x", images=2))
    s.add(entry(2, group="y", images=2))
    ran = run_steps(s, 6)
    assert ran.count(("m", "x")) == ran.count(("m", "y")) == 3
    assert all(a != b for a, b in zip(ran, ran[1:]))


def test_a_high_priority_job_pauses_the_lowest_priority_rows_which_resume_later():
    s = Scheduler({"m": 3})
    s.add(entry(1, priority="low"))
    s.add(entry(2, priority="normal"))
    s.add(entry(3, priority="low"))
    assert sorted(s.schedule(0).admit) == ["1", "2", "3"]
    s.add(entry(4, images=2, priority="high"))
    d = s.schedule(0)
    assert d.admit == ["4"] and d.pause == ["3", "1"]  # the low ones, latest arrival first
    assert {e.id for e in s.running()} == {"2", "4"} and s.entries["1"].state == "paused"
    s.remove("4")
    assert sorted(s.schedule(0).resume) == ["1", "3"]


def test_priority_never_pauses_equal_or_higher_priority_rows():
    s = Scheduler({"m": 1})
    s.add(entry(1, priority="high"))
    s.schedule(0)
    s.add(entry(2, priority="high"))
    d = s.schedule(0)
    assert d.pause == [] and d.release == ["2"]


def test_waiting_high_priority_goes_before_earlier_normal_ones():
    s = Scheduler({"m": 1})
    s.add(entry(1, priority="normal"))
    s.add(entry(2, priority="high"))
    d = s.schedule(0)
    assert d.admit == ["2"] and d.release == ["1"]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        Scheduler({"m": 1}, policy="fifo")


def test_a_new_shape_reaching_a_busy_worker_is_offered_to_idle_workers_once_then_admitted():
    s = Scheduler({"m": 8})
    s.add(entry(1, group="64"))
    s.add(entry(2, group="128", offered=False))  # fresh from the stream, arriving with 1
    s.add(entry(3, group="64", offered=False))  # the running shape: joins at once
    d = s.schedule(0)
    assert d.admit == ["1", "3"] and d.release == ["2"]
    s.add(entry(2, group="128", offered=True))  # nobody took it: it came back reclaimed
    d = s.schedule(0)
    assert d.admit == ["2"]
    assert set(run_steps(s, 4)) == {("m", "64"), ("m", "128")}  # both progress


def test_each_shape_fills_its_own_calls_up_to_the_budget_and_a_model_holds_two_budgets():
    """Sharing one budget between shapes made every call smaller (measured in the open-loop
    load test): a call holds one group's rows, up to the budget; a model holds two budgets."""
    s = Scheduler({"m": 4})
    for i in range(4):
        s.add(entry(i, group="64"))
    for i in range(4, 8):
        s.add(entry(i, group="96"))
    s.add(entry(8, group="128"))
    d = s.schedule(0)
    assert sorted(d.admit, key=int) == [str(i) for i in range(8)] and d.release == ["8"]
    assert s.cost(("m", "64")) == s.cost(("m", "96")) == 4
    assert s.free("m") == 0
