"""The HTTP layer's own logic: body validation and error mapping (D-Bus replaced by a stub)."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from bluegreen import apiauth, client
from bluegreen.api import http as httpapi
from bluegreen.api.names import Error
from bluegreen.client import ApiError


class StubClient:
    def __init__(self) -> None:
        self.deployed: list[tuple[str, str]] = []
        self.error: ApiError | None = None
        self.apps: list[str] = []  # the app of each call
        self.maintenance: tuple[bool, str] = (False, "")
        self.canaries: list[float | None] = []  # the canary option of each deploy
        self.canary: dict[str, Any] = {}  # the Canary property
        self.promoted = 0

    async def deploy(self, ref: str = "", trigger: str = "dbus", wait: bool = False,
                     canary: float | None = None) -> str:
        if self.error:
            raise self.error
        self.deployed.append((ref, trigger + (" wait" if wait else "")))
        self.canaries.append(canary)
        return "12"

    async def promote(self) -> str:
        if not self.canary:
            raise ApiError.of(Error.NO_CANARY, "no canary is under way: nothing to promote")
        self.promoted += 1
        return "12"

    async def rollback(self, target: str = "", trigger: str = "dbus", wait: bool = False) -> str:
        self.deployed.append((target, "rollback" + (" wait" if wait else "")))
        return "13"

    async def status(self) -> dict[str, Any]:
        return {"App": "default", "State": "serving", "ActiveRelease": "a" * 40, "ActivePort": 8123,
                "PublicPort": 5000,
                "Healthy": False, "HealthReason": "the serving release is unhealthy: HTTP 500",
                "Repository": "https://example.com/app.git", "Branch": "main",
                "CurrentDeployment": "", "LastDeployment": "",
                "Maintenance": self.maintenance[0], "MaintenanceMessage": self.maintenance[1],
                "Canary": self.canary}

    async def set_maintenance(self, on: bool, message: str = "") -> None:
        self.maintenance = (on, message if on else "")

    async def app_statuses(self) -> dict[str, dict[str, Any]]:
        return {"default": await self.status(), "staging": {**await self.status(), "App": "staging"}}

    async def instances(self) -> list[dict[str, Any]]:
        return []

    async def workers(self) -> list[dict[str, Any]]:
        return []

    async def pending_settings(self) -> list[dict[str, str]]:
        return []

    async def domains(self) -> list[dict[str, Any]]:
        return [{"domain": "a.example", "issuer": "R3", "expires": 1800000000.0, "reason": ""}]


@pytest.fixture()
def stub(monkeypatch: pytest.MonkeyPatch) -> StubClient:
    instance = StubClient()

    def call(function: Callable[[Any], Coroutine[Any, Any, Any]], app: str = "default") -> Any:
        instance.apps.append(app)
        return asyncio.run(function(instance))

    monkeypatch.setattr(client, "call", call)
    return instance


def arrive_on(web: FlaskClient, connection: socket.socket) -> None:
    """Requests of ``web`` come in on ``connection``, as gunicorn tells the app."""
    environ: dict[str, Any] = web.environ_base
    environ["gunicorn.socket"] = connection


def message(response: TestResponse) -> str:
    assert response.json is not None
    return str(response.json["message"])


@contextlib.contextmanager
def on_unix_socket_of_own_group() -> Iterator[FlaskClient]:
    """A test client whose requests come in on a unix socket from a caller in the privileged
    group (this process, whose own group stands in for bluegreen)."""
    ours, theirs = socket.socketpair()
    original = apiauth.GROUP
    apiauth.GROUP = grp.getgrgid(os.getgid()).gr_name
    try:
        with httpapi.app.test_client() as test_client:
            arrive_on(test_client, ours)
            yield test_client
    finally:
        apiauth.GROUP = original
        ours.close()
        theirs.close()


@pytest.fixture()
def web() -> Iterator[FlaskClient]:
    with on_unix_socket_of_own_group() as test_client:
        yield test_client


def test_deploy_with_and_without_a_body(stub: StubClient, web: FlaskClient) -> None:
    assert web.post("/deploy").status_code == 202
    response = web.post("/deploy", json={"ref": "v2"})
    assert response.status_code == 202
    assert response.json == {"id": "12", "status": "/deployments/12"}
    assert response.headers["Location"] == "/deployments/12"
    assert stub.deployed == [("", "http"), ("v2", "http")]
    assert web.post("/deploy", json={"ref": "v3", "wait": True}).status_code == 202
    assert web.post("/rollback", json={"wait": True}).status_code == 202
    assert stub.deployed[2:] == [("v3", "http wait"), ("", "rollback wait")]


def test_deploy_asks_for_a_canary_given_as_a_share_or_a_percentage(
        stub: StubClient, web: FlaskClient) -> None:
    for body in ({"canary": 0.25}, {"canary": "25%"}, {"ref": "v2", "canary": "0.125"},
                 {"canary": 0}, {"canary": None}, {}):
        assert web.post("/deploy", json=body).status_code == 202, body
    assert stub.canaries == [0.25, 0.25, 0.125, 0.0, None, None]
    assert stub.deployed[2] == ("v2", "http")


@pytest.mark.parametrize("canary", ["lots", "100%", 1, 1.5, -0.1, True, [0.25], "nan"])
def test_a_bad_canary_is_an_invalid_argument_and_deploys_nothing(
        stub: StubClient, web: FlaskClient, canary: object) -> None:
    response = web.post("/deploy", json={"canary": canary})
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "InvalidArgument"
    assert message(response).startswith("canary: ")
    assert stub.deployed == []


def test_promote_ends_the_canary_or_says_there_is_none(stub: StubClient, web: FlaskClient) -> None:
    refused = web.post("/promote")
    assert refused.status_code == 409
    assert refused.json == {"error": "NoCanary", "message": "no canary is under way: nothing to promote"}
    stub.canary = {"share": 0.25}
    response = web.post("/promote")
    assert response.status_code == 202
    assert response.json == {"id": "12", "status": "/deployments/12"}
    assert response.headers["Location"] == "/deployments/12"
    assert stub.promoted == 1


def test_promote_over_tcp_needs_the_token(stub: StubClient, tcp_connection: socket.socket,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("BLUEGREEN_API_TOKEN", "s3cret-token")
    stub.canary = {"share": 0.25}
    with httpapi.app.test_client() as web:
        arrive_on(web, tcp_connection)
        assert web.post("/promote").status_code == 401
        assert stub.promoted == 0
        assert web.post("/promote", headers={"Authorization": "Bearer s3cret-token"}).status_code == 202
    assert stub.promoted == 1


def test_status_has_the_canary_under_way_or_null(stub: StubClient, web: FlaskClient) -> None:
    assert web.get("/status").json["canary"] is None  # type: ignore[index]
    stub.canary = {"share": 0.25, "measured_share": 0.248, "canary_requests": 412,
                   "canary_errors": 3, "stable_requests": 1250, "stable_errors": 2,
                   "elapsed": 12.2, "duration": 60.0}
    assert web.get("/status").json["canary"] == stub.canary  # type: ignore[index]


def test_the_index_lists_every_route(stub: StubClient, web: FlaskClient) -> None:
    listed = set(web.get("/").json["endpoints"])  # type: ignore[index]
    routes = {f"{method} {rule.rule}" for rule in httpapi.app.url_map.iter_rules()
              if not rule.rule.startswith(("/apps/", "/static")) and rule.rule != "/"
              for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})}
    routes = {route.replace("<deployment_id>", "ID") for route in routes}
    assert listed == routes


@pytest.mark.parametrize(("kwargs", "status", "text"), [
    ({"data": "{", "content_type": "application/json"}, 400, "malformed JSON"),
    ({"json": {"ref": ["x"]}}, 400, "must be a string"),
    ({"json": {"branch": "x"}}, 400, "unknown field(s): branch"),
    ({"json": {"wait": "yes"}}, 400, "\"wait\" must be true or false"),
    ({"json": 7}, 400, "JSON object"),
    ({"data": "ref=x", "content_type": "text/plain"}, 415, "must be JSON"),
    ({"data": "x" * (httpapi.MAX_BODY + 1), "content_type": "application/json"}, 413, "larger"),
])
def test_malformed_deploy_requests(stub: StubClient, web: FlaskClient, kwargs: dict[str, Any],
                                   status: int, text: str) -> None:
    response = web.post("/deploy", **kwargs)
    assert response.status_code == status
    assert response.json is not None and text in response.json["message"]
    assert stub.deployed == []


def test_maintenance_is_turned_on_and_off_and_shown_in_the_status(
        stub: StubClient, web: FlaskClient) -> None:
    response = web.post("/maintenance", json={"on": True, "message": "Back at noon"})
    assert response.status_code == 200
    assert response.json == {"maintenance": True, "message": "Back at noon"}
    assert web.get("/status").json["maintenance"] is True  # type: ignore[index]
    assert web.post("/maintenance", json={"on": False}).json == {"maintenance": False, "message": ""}


@pytest.mark.parametrize(("body", "text"), [
    ({}, '"on" is required'),
    ({"on": "yes"}, '"on" must be true or false'),
    ({"on": True, "message": 3}, '"message" must be a string'),
    ({"on": True, "until": "noon"}, "unknown field(s): until"),
])
def test_malformed_maintenance_requests_change_nothing(
        stub: StubClient, web: FlaskClient, body: dict[str, Any], text: str) -> None:
    response = web.post("/maintenance", json=body)
    assert response.status_code == 400
    assert response.json is not None and text in response.json["message"]
    assert stub.maintenance == (False, "")


@pytest.mark.parametrize(("name", "status"), [
    ("org.bluegreen1.Error.Busy", 409), ("org.bluegreen1.Error.InvalidRef", 400),
    ("org.bluegreen1.Error.UnknownRef", 422), ("org.freedesktop.DBus.Error.AccessDenied", 403),
    ("org.freedesktop.DBus.Error.ServiceUnknown", 503), ("org.example.Weird", 500),
])
def test_daemon_errors_map_to_http_statuses(stub: StubClient, web: FlaskClient, name: str,
                                            status: int) -> None:
    stub.error = ApiError(name, "the daemon says no")
    response = web.post("/deploy", json={"ref": "main"})
    assert response.status_code == status
    assert response.json == {"error": name.rsplit(".", 1)[-1], "message": "the daemon says no"}


def test_health_is_503_with_the_reason_when_unhealthy(stub: StubClient, web: FlaskClient) -> None:
    response = web.get("/health")
    assert response.status_code == 503
    assert response.json == {"healthy": False, "reason": "the serving release is unhealthy: HTTP 500"}


def test_status_shows_each_domain_and_its_certificate(stub: StubClient, web: FlaskClient) -> None:
    response = web.get("/status")
    assert response.status_code == 200
    assert response.json is not None
    assert response.json["domains"] == [{"domain": "a.example", "issuer": "R3",
                                         "expires": 1800000000.0, "reason": ""}]


def test_history_limit_is_validated(stub: StubClient, web: FlaskClient) -> None:
    assert web.get("/history?limit=0").status_code == 400
    assert web.get("/history?limit=abc").status_code == 400
    missing = web.get("/nowhere")
    assert missing.status_code == 404
    assert missing.json is not None and missing.json["error"] == "NotFound"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children,
                                                                       max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(body=json_values | st.dictionaries(st.sampled_from(["ref", "target", "canary", "x"]), json_values,
                                          max_size=2))
def test_any_json_body_gets_an_answer_never_a_crash(body: object) -> None:
    with stubbed() as web:
        for path in ("/deploy", "/rollback"):
            response = web.post(path, json=body)
            assert response.status_code in (202, 400), (path, body, response.json)
            assert response.json is not None
            if response.status_code == 400:
                assert response.json["error"] in ("BadRequest", "InvalidArgument")
                assert response.json["message"]


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_as_a_body_get_an_answer(raw: bytes) -> None:
    with stubbed() as web:
        response = web.post("/deploy", data=raw, content_type="application/json")
    assert response.status_code in (202, 400), response.status_code


@contextlib.contextmanager
def stubbed() -> Iterator[FlaskClient]:
    """A test client whose D-Bus calls reach a StubClient (hypothesis runs many examples in one
    test, which a function-scoped fixture would not reset)."""
    instance = StubClient()

    def call(function: Callable[[Any], Coroutine[Any, Any, Any]], app: str = "default") -> Any:
        instance.apps.append(app)
        return asyncio.run(function(instance))

    original = client.call
    client.call = call  # type: ignore[assignment]
    try:
        with on_unix_socket_of_own_group() as web:
            yield web
    finally:
        client.call = original


# --- who may change anything ---------------------------------------------------------------

@pytest.fixture()
def tcp_connection() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        yield sock


@pytest.mark.parametrize("listen", ["loopback", "no socket"])
def test_changes_over_tcp_need_the_token_even_on_loopback(
        stub: StubClient, tcp_connection: socket.socket, monkeypatch: pytest.MonkeyPatch,
        listen: str) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("BLUEGREEN_API_TOKEN", "s3cret-token")
    with httpapi.app.test_client() as web:
        if listen == "loopback":
            arrive_on(web, tcp_connection)
        web.environ_base["REMOTE_ADDR"] = "127.0.0.1"
        missing = web.post("/deploy")
        assert missing.status_code == 401 and "Bearer" in message(missing)
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = web.post("/rollback", headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 401
        assert web.get("/").status_code == 200  # reading needs nothing
        assert stub.deployed == []
        good = web.post("/deploy", headers={"Authorization": "Bearer s3cret-token"})
        assert good.status_code == 202
    assert stub.deployed == [("", "http")]


def test_without_a_token_changes_over_tcp_are_refused(
        stub: StubClient, tcp_connection: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("BLUEGREEN_API_TOKEN", raising=False)
    with httpapi.app.test_client() as web:
        arrive_on(web, tcp_connection)
        response = web.post("/deploy", headers={"Authorization": "Bearer "})
    assert response.status_code == 403
    assert apiauth.SOCKET_PATH in message(response)
    assert stub.deployed == []


def test_on_the_unix_socket_the_callers_credentials_decide(stub: StubClient, web: FlaskClient,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert web.post("/deploy").status_code == 202
    monkeypatch.setattr(apiauth, "GROUP", "no-such-group-here")
    refused = web.post("/deploy")
    if os.getuid() == 0:
        assert refused.status_code == 202  # root may
    else:
        assert refused.status_code == 403
        assert f"uid {os.getuid()}" in message(refused)
    assert web.post("/hooks/push").status_code == 401  # the webhook's own signature decides


def test_peer_credentials_of_a_unix_socket() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        caller = apiauth.peer(ours)
    assert (caller.pid, caller.uid, caller.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert caller.groups is not None and set(os.getgroups()) <= caller.groups | {os.getgid()}


@pytest.mark.parametrize(("peer", "allowed"), [
    (apiauth.Peer(1, 0, 0, frozenset()), True),  # root
    (apiauth.Peer(1, 4242, 4242, frozenset({4242})), False),
    (apiauth.Peer(1, 4242, 4242, frozenset({4242, 0})), True),  # a member: supplementary group
    (apiauth.Peer(1, 4242, 0, frozenset()), True),  # a member: primary group
])
def test_root_and_members_of_the_group_are_privileged(peer: apiauth.Peer, allowed: bool) -> None:
    group = grp.getgrgid(0).gr_name
    assert apiauth.privileged(peer, group) is allowed
    assert not apiauth.privileged(apiauth.Peer(1, 4242, 0, frozenset()), "no-such-group-here")


def test_the_routes_of_another_app_reach_its_object(stub: StubClient) -> None:
    with on_unix_socket_of_own_group() as web:
        assert web.post("/apps/staging/deploy", json={"ref": "v2"}).status_code == 202
        assert web.get("/apps/staging/health").status_code == 503
        assert web.post("/deploy").status_code == 202
    assert stub.deployed == [("v2", "http"), ("", "http")]
    assert stub.apps == ["staging", "staging", "default"]


def test_an_unknown_app_is_404(stub: StubClient) -> None:
    stub.error = ApiError("org.bluegreen1.Error.NoSuchApp", "no app 'nope'")
    with on_unix_socket_of_own_group() as web:
        response = web.post("/apps/nope/deploy")
    assert response.status_code == 404
    assert (response.get_json() or {})["error"] == "NoSuchApp"


def test_a_route_naming_no_possible_app_is_404_without_a_call(stub: StubClient) -> None:
    with on_unix_socket_of_own_group() as web:
        response = web.get("/apps/Foo-bar/status")  # not even a D-Bus object path
    assert response.status_code == 404
    assert (response.get_json() or {})["error"] == "NoSuchApp"
    assert stub.apps == []


def test_the_app_list_names_each_app_with_its_routes(stub: StubClient) -> None:
    with on_unix_socket_of_own_group() as web:
        listed = web.get("/apps").get_json() or []
    assert [(app["name"], app["api"]) for app in listed] == [("default", "/"), ("staging", "/apps/staging/")]
    assert all(app["release"] == "a" * 40 for app in listed), listed
