"""Which deployments run the release phase: only a release moving forward, once per host."""

from __future__ import annotations

import pytest

from bluegreen.deploy import no_release_phase
from bluegreen.history import Trigger

FORWARD = (Trigger.CLI, Trigger.DBUS, Trigger.HTTP, Trigger.REFRESHER)


@pytest.mark.parametrize("trigger", FORWARD)
def test_a_new_release_deployed_by_anyone_runs_its_release_phase(trigger: Trigger) -> None:
    assert no_release_phase(trigger, ran_before=False, served_before=False) is None


@pytest.mark.parametrize("trigger", [*FORWARD, Trigger.STARTUP])
def test_a_release_phase_that_ran_here_never_runs_again(trigger: Trigger) -> None:
    assert no_release_phase(trigger, ran_before=True, served_before=False) == \
        "it ran to its end on this host before"


@pytest.mark.parametrize("ran_before", [False, True])
@pytest.mark.parametrize("served_before", [False, True])
def test_rollbacks_and_recoveries_never_run_it(ran_before: bool, served_before: bool) -> None:
    for trigger in (Trigger.ROLLBACK, Trigger.RECOVERY):
        assert no_release_phase(trigger, ran_before=ran_before, served_before=served_before)


def test_the_start_up_deploy_runs_it_only_for_a_release_that_never_served() -> None:
    # A release that served only by a rollback never ran its release phase: at boot it must not.
    assert no_release_phase(Trigger.STARTUP, ran_before=False, served_before=True)
    # Nothing ever served (the first boot after an install): the branch's head moves forward.
    assert no_release_phase(Trigger.STARTUP, ran_before=False, served_before=False) is None
