"""The HTTP API: Flask, a thin client of the D-Bus API. Runs in bluegreen-api.service (gunicorn,
socket-activated), never in the controller.

Every answer is JSON; errors are ``{"error": NAME, "message": TEXT}`` with a 4xx or 5xx status.
The routes are the default app's; ``/apps/NAME/...`` are the same routes for the app NAME, and
``GET /apps`` lists the apps.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from bluegreen import apiauth, apps, client, credentials
from bluegreen.api.names import DEFAULT_APP, Error
from bluegreen.client import ApiError, Client
from bluegreen.config import parse_share

MAX_BODY = 64 * 1024
MAX_HOOK_BODY = 5 * 1024 * 1024  # push payloads list the commits pushed

app = Flask("bluegreen")
app.config["MAX_CONTENT_LENGTH"] = MAX_HOOK_BODY
# The routes of one app, at / for the default app and at /apps/NAME/ for the others.
routes = Blueprint("api", "bluegreen")

T = TypeVar("T")

API_TOKEN = ("api-token", "BLUEGREEN_API_TOKEN")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        self.message = message
        self.status = status
        super().__init__(message)


def reply(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, indent=2, sort_keys=True) + "\n", status=status,
                    mimetype="application/json")


def error(name: str, message: str, status: int) -> Response:
    return reply({"error": name, "message": message}, status)


@app.before_request
def _require_privilege() -> Response | None:
    """Changing anything takes proof of privilege (webhooks carry a signature of their own):
    on the unix socket the caller's credentials, on TCP the API token. Which one is decided by
    the socket the request came in on, never by the configuration."""
    if request.method in ("GET", "HEAD") or (request.endpoint or "").endswith(".push_hook"):
        return None
    connection = request.environ.get("gunicorn.socket")
    if apiauth.is_unix(connection):
        caller = apiauth.peer(connection)
        if apiauth.privileged(caller):
            return None
        return error("Forbidden", f"{caller.describe()} is neither root nor a member of the group "
                     f"{apiauth.GROUP}: changes are refused", 403)
    token = credentials.read(API_TOKEN)
    if not token:
        return error("Forbidden", "changes over TCP need the API token, and no api-token "
                     f"credential is configured ({apiauth.TOKEN_FILE}); members of the group "
                     f"{apiauth.GROUP} can use the unix socket {apiauth.SOCKET_PATH}", 403)
    if not apiauth.token_matches(request.headers.get("Authorization", ""), token):
        response = error("Unauthorized", "changes over TCP need an Authorization: Bearer token "
                         f"(or, for members of the group {apiauth.GROUP}, the unix socket "
                         f"{apiauth.SOCKET_PATH})", 401)
        response.headers["WWW-Authenticate"] = 'Bearer realm="bluegreen"'
        return response
    return None


@app.url_value_preprocessor
def _app_of_the_route(endpoint: str | None, values: dict[str, Any] | None) -> None:
    g.app = (values or {}).pop("app", DEFAULT_APP)
    if g.app != DEFAULT_APP and apps.name_problem(g.app):  # nor a D-Bus object path
        raise ApiError.of(Error.NO_SUCH_APP, f"no app {g.app!r} (GET /apps lists them)")


def _call(function: Callable[[Client], Awaitable[T]]) -> T:
    """A call to the D-Bus API of the route's app."""
    return client.call(function, g.get("app", DEFAULT_APP))


@app.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Response:
    return error(exc.short_name, exc.message, exc.http_status)


@app.errorhandler(BadRequest)
def _bad_request(exc: BadRequest) -> Response:
    return error("BadRequest", exc.message, exc.status)


@app.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return error(type(exc).__name__, exc.description or exc.name, exc.code or 500)


def _summary(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": status["State"],
        "release": status["ActiveRelease"] or None,
        "port": status["ActivePort"] or None,
        "public_port": status["PublicPort"],
        "healthy": status["Healthy"],
        "health": status["HealthReason"],
        "repository": status["Repository"],
        "branch": status["Branch"],
        "maintenance": status["Maintenance"],
    }


@routes.get("/")
def index() -> Response:
    status = _call(lambda c: c.status())
    summary = _summary(status)
    summary["service"] = "bluegreen"
    summary["app"] = status["App"]
    summary["endpoints"] = ["GET /apps", "GET /health", "GET /status", "GET /metrics", "POST /deploy",
                            "POST /promote", "POST /rollback", "POST /maintenance",
                            "POST /hooks/push", "GET /history", "GET /deployments/ID"]
    return reply(summary)


@routes.get("/health")
def health() -> Response:
    try:
        status = _call(lambda c: c.status())
    except ApiError as exc:
        return reply({"healthy": False, "reason": exc.message}, 503)
    healthy = bool(status["Healthy"])
    return reply({"healthy": healthy, "reason": status["HealthReason"]}, 200 if healthy else 503)


@routes.get("/status")
def status() -> Response:
    async def gather(c: Client) -> dict[str, Any]:
        status = await c.status()
        result = _summary(status)
        result["forwarder_target"] = status["ActivePort"] or None
        result["instances"] = await c.instances()
        result["workers"] = await c.workers()
        result["pending_settings"] = await c.pending_settings()
        result["domains"] = await c.domains()
        result["canary"] = status.get("Canary") or None  # the property is {} when none runs
        current, last = status["CurrentDeployment"], status["LastDeployment"]
        result["current_deployment"] = await c.deployment(current) if current else None
        result["last_deployment"] = await c.deployment(last) if last else None
        return result

    return reply(_call(gather))


def _json_object(accepted: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object of a POST body ({} when there is none), with no field but these."""
    if (request.content_length or 0) > MAX_BODY:
        raise BadRequest(f"the body is larger than {MAX_BODY} bytes", 413)
    body = request.get_data(cache=True)
    if not body.strip():
        return {}
    if request.mimetype != "application/json":
        raise BadRequest("the body must be JSON (Content-Type: application/json)", 415)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object like {{\"{accepted[0]}\": ...}}")
    unknown = sorted(set(data) - set(accepted))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}; only "
                         + " and ".join(f'"{name}"' for name in accepted) + " are accepted")
    return data


def _field(data: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        wanted = {bool: "true or false", str: "a string"}.get(kind, kind.__name__)
        raise BadRequest(f"\"{name}\" must be {wanted}, not {type(value).__name__}")
    return value


def _json_request(field: str, *others: str) -> tuple[str, bool, dict[str, Any]]:
    """The string field a POST body may hold ("" when there is no body), its ``wait``: while
    another deployment runs, wait for it to end (instead of 409), and the body itself, which
    may hold ``others`` too."""
    data = _json_object((field, "wait", *others))
    return _field(data, field, str, ""), _field(data, "wait", bool, False), data


def _canary(data: dict[str, Any]) -> float | None:
    """The canary's share a deploy asks for (0.25 or "25%"; None: canary.share), refused as the
    D-Bus API refuses a share out of range."""
    value = data.get("canary")
    if value is None:
        return None
    try:
        return parse_share(value)
    except ValueError as exc:
        raise ApiError.of(Error.INVALID_ARGUMENT, f"canary: {exc}") from None


def _accepted(deployment_id: str) -> Response:
    response = reply({"id": deployment_id, "status": f"/deployments/{deployment_id}"}, 202)
    response.headers["Location"] = f"/deployments/{deployment_id}"
    return response


@routes.post("/deploy")
def deploy() -> Response:
    """Deploy {"ref": ...} (default: the branch's head), with {"canary": SHARE} first."""
    ref, wait, data = _json_request("ref", "canary")
    canary = _canary(data)
    return _accepted(_call(lambda c: c.deploy(ref, trigger="http", wait=wait, canary=canary)))


@routes.post("/promote")
def promote() -> Response:
    """End the canary under way with a promotion: its deployment goes on to the switch."""
    return _accepted(_call(lambda c: c.promote()))


@routes.post("/rollback")
def rollback() -> Response:
    """Roll back to the previous good release, or to {"target": DEPLOYMENT_ID or COMMIT}."""
    target, wait, _ = _json_request("target")
    return _accepted(_call(lambda c: c.rollback(target, trigger="http", wait=wait)))


@routes.post("/maintenance")
def set_maintenance() -> Response:
    """{"on": true, "message": "..."}: the front answers the app's domains with a 503 page;
    {"on": false}: it serves them again."""
    data = _json_object(("on", "message"))
    if "on" not in data:
        raise BadRequest('"on" is required: true turns maintenance on, false off')
    on, message = _field(data, "on", bool, False), _field(data, "message", str, "")

    async def change(c: Client) -> dict[str, Any]:
        await c.set_maintenance(on, message)
        status = await c.status()
        return {"maintenance": status["Maintenance"], "message": status["MaintenanceMessage"]}

    return reply(_call(change))


@routes.post("/hooks/push")
def push_hook() -> Response:
    """A push webhook (GitHub's format): signed with the shared secret, it triggers a poll."""
    signature = request.headers.get("X-Hub-Signature-256", "")
    if not signature:
        raise BadRequest("the X-Hub-Signature-256 header is missing", 401)
    payload = request.get_data(cache=False)
    _call(lambda c: c.notify_push(payload, signature))
    return reply({"refreshing": True}, 202)


@routes.get("/deployments/<deployment_id>")
def deployment(deployment_id: str) -> Response:
    return reply(_call(lambda c: c.deployment(deployment_id)))


@routes.get("/metrics")
def metrics() -> Response:
    """Prometheus text format."""
    text = _call(lambda c: c.metrics())
    return Response(text, mimetype="text/plain", content_type="text/plain; version=0.0.4")


@routes.get("/history")
def history() -> Response:
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise BadRequest("limit must be an integer from 1 to 1000")
    return reply(_call(lambda c: c.deployments(int(raw))))


@app.get("/apps")
def app_list() -> Response:
    """Every app with what serves it; each one's routes are under its "api"."""
    async def gather(c: Client) -> list[dict[str, Any]]:
        return [{**_summary(status), "name": name,
                 "api": "/" if name == DEFAULT_APP else f"/apps/{name}/"}
                for name, status in (await c.app_statuses()).items()]

    return reply(client.call(gather))


app.register_blueprint(routes)
app.register_blueprint(routes, url_prefix="/apps/<app>", name="apps")
