"""A canary's arithmetic: the weights it asks of the steering program, and what both releases'
answers decide."""

from __future__ import annotations

import asyncio

import pytest

from bluegreen import canary
from bluegreen.answers import Answers
from bluegreen.canary import Decision, Reading, Side, Verdict
from bluegreen.config import CanaryConfig, ConfigError, load_mapping, parse_share, share_text

SETTINGS = CanaryConfig(share=0.25, duration=60, max_error_rate=0.05, min_requests=100)


def reading(canary_side: Side, stable: Side, elapsed: float = 10.0) -> Reading:
    return Reading(0.25, canary_side, stable, elapsed, SETTINGS.duration)


def test_a_release_that_fails_more_than_the_old_one_is_aborted_as_soon_as_it_has_enough_answers() -> None:
    bad = reading(Side(120, 36), Side(360, 0))
    decision = canary.decide(bad, SETTINGS)
    assert decision is not None and decision.verdict == Verdict.ABORT
    assert "30.0%" in decision.reason and "0.0%" in decision.reason  # both releases' rates
    assert canary.decide(reading(Side(99, 30), Side(300, 0)), SETTINGS) is None  # too few yet


def test_errors_within_max_error_rate_of_the_old_releases_are_no_reason_to_abort() -> None:
    assert canary.decide(reading(Side(200, 20), Side(600, 40)), SETTINGS) is None  # 10 % vs 6.7 %
    assert canary.decide(reading(Side(200, 20), Side(600, 0)), SETTINGS) is not None  # vs 0 %


def test_a_good_release_is_promoted_when_its_time_is_up() -> None:
    assert canary.decide(reading(Side(300, 0), Side(900, 1), elapsed=59.9), SETTINGS) is None
    decision = canary.decide(reading(Side(300, 0), Side(900, 1), elapsed=60), SETTINGS)
    assert decision == Decision(Verdict.PROMOTE, decision.reason if decision else "")
    assert decision is not None and "canary promoted" in decision.reason


def test_below_min_requests_health_alone_decides_and_the_reason_says_so() -> None:
    decision = canary.decide(reading(Side(12, 6), Side(40, 0), elapsed=60), SETTINGS)
    assert decision is not None and decision.verdict == Verdict.PROMOTE
    assert "health checks alone" in decision.reason and "min_requests" in decision.reason


def test_the_share_is_split_among_each_releases_instances() -> None:
    assert canary.weights([8002], [8001], 0.25) == {8001: 750, 8002: 250}
    assert canary.weights([8003, 8004], [8001, 8002], 0.25) == {8001: 375, 8002: 375,
                                                                8003: 125, 8004: 125}
    assert canary.weights([8002], [8001], 0.0001)[8002] == 1  # never nothing


def test_a_side_counts_what_came_since_the_canary_began() -> None:
    before = Answers({"1xx": 0, "2xx": 10, "3xx": 0, "4xx": 0, "5xx": 2}, [0] * 11, 12, 0.1)
    now = Answers({"1xx": 0, "2xx": 40, "3xx": 0, "4xx": 5, "5xx": 5}, [0] * 11, 50, 0.5)
    side = Side.since(now, before)
    assert (side.requests, side.errors) == (38, 3)
    assert Side.since(before, now) == Side(0, 0)  # an instance that restarted: nothing negative
    assert reading(Side(25, 0), Side(75, 0)).measured_share == 0.25


def test_an_operator_promotes_only_a_canary_that_runs() -> None:
    analysis = canary.Analysis()
    assert not analysis.promote("promoted by the operator")

    async def run() -> Decision:
        async def healthy() -> str | None:
            return None

        task = asyncio.ensure_future(analysis.run(
            [1], [2], (Answers(), Answers()), 0.25, SETTINGS, 0.05, healthy, asyncio.Event(),
            lambda: ""))
        while analysis.reading is None:
            await asyncio.sleep(0.01)
        assert analysis.promote("promoted by the operator")
        return await asyncio.wait_for(task, 2)

    decision = asyncio.run(run())
    assert decision.verdict == Verdict.PROMOTE and decision.reason.startswith("promoted by")
    assert analysis.reading is None


def test_a_rollback_or_trouble_aborts_a_canary() -> None:
    async def run(rollback: bool, trouble: str | None) -> Decision:
        async def health() -> str | None:
            return trouble

        asked = asyncio.Event()
        if rollback:
            asked.set()
        return await asyncio.wait_for(canary.Analysis().run(
            [1], [2], (Answers(), Answers()), 0.25, SETTINGS, 0.05, health, asked,
            lambda: "aborted by the operator"), 2)

    assert asyncio.run(run(True, None)).reason.startswith("aborted by the operator")
    decision = asyncio.run(run(False, "3 health checks failed"))
    assert decision.verdict == Verdict.ABORT and "unhealthy during the canary" in decision.reason


@pytest.mark.parametrize(("raw", "share"), [("25%", 0.25), (0.1, 0.1), ("0.5", 0.5), (0, 0.0)])
def test_a_share_is_a_fraction_or_a_percentage(raw: object, share: float) -> None:
    assert parse_share(raw) == share


@pytest.mark.parametrize("raw", ["100%", 1, -0.2, "a lot", True, "nan"])
def test_a_share_outside_0_to_1_is_refused(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_share(raw)
    with pytest.raises(ConfigError, match=r"canary\.share"):
        load_mapping({"canary": {"share": raw}}, "bluegreen.toml")


def test_a_canary_whose_old_release_fails_is_promoted() -> None:
    async def run() -> Decision:
        async def healthy() -> str | None:
            return None

        async def failed() -> str | None:
            return "bluegreen-app@8001.service failed"

        return await asyncio.wait_for(canary.Analysis().run(
            [2], [1], (Answers(), Answers()), 0.25, SETTINGS, 0.05, healthy, asyncio.Event(),
            lambda: "", None, failed), 2)

    decision = asyncio.run(run())
    assert decision.verdict == Verdict.PROMOTE and "old release failed" in decision.reason


def test_a_share_is_told_as_written() -> None:
    assert [share_text(x) for x in (0.25, 0.125, 0.1, 0.001)] == ["25%", "12.5%", "10%", "0.1%"]
