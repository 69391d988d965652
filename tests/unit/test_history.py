from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from bluegreen.history import SCHEMA, History, State, Step, Trigger, finished, with_step


def test_a_deployment_is_recorded_step_by_step(tmp_path: Path) -> None:
    history = History(tmp_path / "db.sqlite")
    record = history.begin("main", Trigger.HTTP, commit="a" * 40, subject="s", author="me",
                           previous_port=8001, now=100.0)
    assert record.state == State.RUNNING and record.id == 1
    record = with_step(record, Step.MATERIALIZE, now=101.0)
    record = with_step(record, Step.START, now=102.5)
    history.save(record)
    record = finished(record, State.FAILED, failed_step=Step.START, reason="boom", now=104.0)
    history.save(record)
    again = History(tmp_path / "db.sqlite").get(1)
    assert again.state == State.FAILED and again.reason == "boom" and again.failed_step == "start"
    assert [(s.step, s.started, s.finished) for s in again.steps] == [
        ("materialize", 101.0, 102.5), ("start", 102.5, 104.0)]
    assert again.duration == 4.0
    assert again.steps[0].step == "materialize"


def test_recent_last_succeeded_and_interrupted(tmp_path: Path) -> None:
    history = History(tmp_path / "db.sqlite")
    first = history.begin("main", Trigger.DBUS, commit="1" * 40)
    history.save(finished(first, State.SUCCEEDED))
    second = history.begin("main", Trigger.CLI, commit="2" * 40)
    history.save(finished(second, State.FAILED, reason="x"))
    third = history.begin("main", Trigger.REFRESHER, commit="3" * 40)
    assert [d.id for d in history.recent(2)] == [third.id, second.id]
    last = history.last_succeeded()
    assert last is not None and last.commit == "1" * 40
    interrupted = history.mark_interrupted("controller died")
    assert [d.id for d in interrupted] == [third.id]
    assert history.get(third.id).state == State.INTERRUPTED
    assert history.mark_interrupted("again") == []


def test_a_failed_write_leaves_the_previous_record_intact(tmp_path: Path) -> None:
    history = History(tmp_path / "db.sqlite")
    record = history.begin("main", Trigger.DBUS, commit="1" * 40)
    with pytest.raises(RuntimeError), history._transaction() as db:
        db.execute("UPDATE deployments SET state = 'succeeded' WHERE id = ?", (record.id,))
        raise RuntimeError("disk full, say")
    assert history.get(record.id).state == State.RUNNING


def test_unknown_ids_raise_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        History(tmp_path / "db.sqlite").get(42)


def test_prune_keeps_the_rollback_target_and_the_last_success(tmp_path: Path) -> None:
    history = History(tmp_path / "db.sqlite")
    target = history.begin("main", Trigger.DBUS, commit="1" * 40)
    history.save(finished(target, State.SUCCEEDED))
    serving = history.begin("main", Trigger.DBUS, commit="2" * 40)
    history.save(finished(serving, State.SUCCEEDED))
    for _ in range(5):
        history.save(finished(history.begin("main", Trigger.DBUS, commit="3" * 40), State.FAILED))
    assert history.prune(2, serving="2" * 40) == 3
    kept = [d.id for d in history.recent(10)]
    assert target.id in kept and serving.id in kept and len(kept) == 4
    rollback = history.rollback_target("2" * 40)
    assert rollback is not None and rollback.id == target.id


def test_records_of_a_switch_back_under_its_former_name_read_back_under_the_new_one(
        tmp_path: Path) -> None:
    history = History(tmp_path / "db.sqlite")
    switched = history.begin("main", Trigger.DBUS, commit="1" * 40)
    for step, now in ((Step.SWITCH, 1.0), (Step.DRAIN, 2.0), (Step.WATCH, 3.0), (Step.SWITCH_BACK, 4.0)):
        switched = with_step(switched, step, now=now)
    history.save(finished(switched, State.SWITCHED_BACK, failed_step=Step.WATCH, reason="sick", now=5.0))
    unsettled = with_step(history.begin("main", Trigger.CLI, commit="2" * 40), Step.SWITCH_BACK, now=6.0)
    history.save(finished(unsettled, State.FAILED, failed_step=Step.SWITCH_BACK, reason="masked", now=7.0))
    rollback = history.begin("1" * 40, Trigger.ROLLBACK, commit="1" * 40)
    history.save(finished(with_step(rollback, Step.START, now=8.0), State.SUCCEEDED, now=9.0))
    history.db.execute("UPDATE deployments SET state = 'rolled-back' WHERE state = 'switched-back'")
    history.db.execute("UPDATE deployments SET failed_step = 'rollback' WHERE failed_step = 'switch-back'")
    history.db.execute("UPDATE deployments SET steps = replace(steps, '\"switch-back\"', '\"rollback\"')")
    history.close()

    again = History(tmp_path / "db.sqlite")
    first, second, third = (again.get(record.id) for record in (switched, unsettled, rollback))
    assert (first.state, first.failed_step, first.reason) == (State.SWITCHED_BACK, Step.WATCH, "sick")
    assert [(s.step, s.started, s.finished) for s in first.steps] == [
        ("switch", 1.0, 2.0), ("drain", 2.0, 3.0), ("watch", 3.0, 4.0), ("switch-back", 4.0, 5.0)]
    assert (second.state, second.failed_step) == (State.FAILED, Step.SWITCH_BACK)
    assert [s.step for s in second.steps] == ["switch-back"]
    assert (third.trigger, third.state, [s.step for s in third.steps]) == (
        Trigger.ROLLBACK, State.SUCCEEDED, ["start"])
    assert not again.db.in_transaction


def _through(history: History, commit: str, *steps: Step, state: State = State.SUCCEEDED) -> None:
    record = history.begin("main", Trigger.CLI, commit=commit, now=100.0)
    for offset, step in enumerate(steps):
        record = with_step(record, step, now=101.0 + offset)
        history.save(record)
    history.save(finished(record, state, now=110.0))


def test_a_release_phase_that_ran_to_its_end_is_remembered_past_pruning(tmp_path: Path) -> None:
    history = History(tmp_path / "db.sqlite")
    _through(history, "1" * 40, Step.VERIFY, Step.MIGRATE, Step.START, Step.HEALTH,
             state=State.FAILED)  # failed later: its release phase had run all the same
    _through(history, "2" * 40, Step.VERIFY, Step.MIGRATE, state=State.FAILED)
    _through(history, "3" * 40, Step.VERIFY, Step.START)  # a release without one
    assert history.release_phase_ran("1" * 40)
    assert not history.release_phase_ran("2" * 40) and not history.release_phase_ran("3" * 40)
    assert history.served("3" * 40) and not history.served("1" * 40)
    for _ in range(3):
        _through(history, "4" * 40, Step.VERIFY, Step.START)
    assert history.prune(keep=1) > 0
    with pytest.raises(KeyError):
        history.get(1)
    assert History(tmp_path / "db.sqlite").release_phase_ran("1" * 40)


def test_records_written_before_the_release_phases_were_kept_count(tmp_path: Path) -> None:
    history = History(tmp_path / "db.sqlite")
    _through(history, "1" * 40, Step.VERIFY, Step.MIGRATE, Step.START)
    _through(history, "2" * 40, Step.VERIFY, Step.MIGRATE, state=State.FAILED)
    history.db.execute("DELETE FROM release_phases")
    reopened = History(tmp_path / "db.sqlite")
    assert reopened.release_phase_ran("1" * 40) and not reopened.release_phase_ran("2" * 40)


WEB_STEPS = ("python manage.py migrate -> release phase",
             "gunicorn mysite.wsgi -> serves mysite.wsgi:application")


def test_a_record_keeps_what_became_of_the_web_lines_steps(tmp_path: Path) -> None:
    history = History(tmp_path / "db.sqlite")
    record = history.begin("main", Trigger.HTTP, commit="a" * 40)
    history.save(replace(record, web_steps=WEB_STEPS))
    assert History(tmp_path / "db.sqlite").get(record.id).web_steps == WEB_STEPS


def test_records_written_before_web_steps_were_kept_read_back(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace("    steps TEXT NOT NULL DEFAULT '[]',\n"
                                     "    web_steps TEXT NOT NULL DEFAULT '[]'\n",
                                     "    steps TEXT NOT NULL DEFAULT '[]'\n"))
    old.execute("INSERT INTO deployments (ref, trigger, state, started_at) "
                "VALUES ('main', 'cli', 'succeeded', 1.0)")
    old.commit()
    old.close()
    history = History(path)
    assert history.get(1).web_steps == ()
    history.save(replace(history.get(1), web_steps=WEB_STEPS))
    assert History(path).get(1).web_steps == WEB_STEPS
