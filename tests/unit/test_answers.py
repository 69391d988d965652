"""An instance's answers: counted per process in a file, summed per instance; the gunicorn hook
and the ASGI wrapper count every answer, a failed request as a 5xx."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bluegreen import answers, asgidrain, gunicornconf


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An instance's runtime directory, as systemd gives it, a fresh counter, its umask."""
    old_umask = os.umask(0o077)
    yield from _instance(tmp_path, monkeypatch)
    os.umask(old_umask)


def _instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "8123"
    directory.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(directory))
    monkeypatch.setattr(answers, "_mine", {})
    yield directory


def test_answers_are_counted_by_class_and_duration_and_summed(instance: Path) -> None:
    for status, seconds in ((200, 0.001), (201, 0.02), (302, 0.3), (404, 0.004), (500, 7.0),
                            (None, 0.002)):
        answers.record(status, seconds)
    # Another worker of the same instance, in a file of its own, answered the same.
    (instance / "answers.999999").write_bytes((instance / f"answers.{os.getpid()}").read_bytes())
    total = answers.read(8123, instance.parent)
    assert total.classes == {"1xx": 0, "2xx": 4, "3xx": 2, "4xx": 2, "5xx": 4}
    assert total.count == 12 and total.errors == 4
    assert total.error_rate == pytest.approx(4 / 12)
    assert total.buckets[0] == 6  # <= 5 ms: 0.001, 0.004, 0.002, twice
    assert total.buckets[-2] == 10  # <= 5 s: all but the 7-s ones
    assert total.buckets[-1] == 12
    assert total.seconds == pytest.approx(2 * (0.001 + 0.02 + 0.3 + 0.004 + 7.0 + 0.002))
    # Readable by a controller without CAP_DAC_OVERRIDE, whatever the instance's umask.
    assert stat.S_IMODE((instance / f"answers.{os.getpid()}").stat().st_mode) == 0o644


def test_an_instance_that_is_gone_or_cannot_count_has_no_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert answers.read(8999, tmp_path).count == 0
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "missing"))
    monkeypatch.setattr(answers, "_mine", {})
    answers.record(200, 0.1)  # no error, nothing counted
    assert answers.counter() is None


class Request:
    method, path = "GET", "/"
    headers: list[tuple[str, str]] = [("HOST", "localhost")]


class Response:
    def __init__(self, status: int | None) -> None:
        self.status_code = status


class Worker:
    class log:  # noqa: N801
        @staticmethod
        def debug(*_: Any) -> None:
            pass

    class cfg:  # noqa: N801
        keepalive = 2


def test_the_gunicorn_hooks_count_each_answer_a_failed_one_as_5xx(instance: Path) -> None:
    for status in (200, None):
        request = Request()
        gunicornconf.pre_request(Worker(), request)
        gunicornconf.post_request(Worker(), request, {}, Response(status))
    total = answers.read(8123, instance.parent)
    assert total.classes["2xx"] == 1 and total.classes["5xx"] == 1


def test_bluegreens_own_health_checks_are_not_counted(instance: Path) -> None:
    probe = Request()
    probe.headers = [("HOST", "localhost"), ("USER-AGENT", answers.HEALTH_AGENT)]
    gunicornconf.pre_request(Worker(), probe)
    gunicornconf.post_request(Worker(), probe, {}, Response(200))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def ignore(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "path": "/health",
             "headers": [(b"user-agent", answers.HEALTH_AGENT.encode())]}
    asyncio.run(asgidrain.Drain(app, None)(scope, receive, ignore))
    assert answers.read(8123, instance.parent).count == 0


def test_the_asgi_wrapper_counts_each_answer_a_failed_one_as_5xx(instance: Path) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def both(wrapped: asgidrain.Drain) -> None:
        await wrapped({"type": "http", "path": "/"}, receive, send)
        with pytest.raises(RuntimeError):
            await wrapped({"type": "http", "path": "/boom"}, receive, send)

    for flag in (None, str(instance / "drain")):  # with the drain flag's wrapper and without
        asyncio.run(both(asgidrain.Drain(app, flag)))
    total = answers.read(8123, instance.parent)
    assert total.classes["4xx"] == 2 and total.classes["5xx"] == 2 and total.count == 4
