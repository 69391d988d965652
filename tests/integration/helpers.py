"""Driving bluegreen inside a sandbox: the app repository, the APIs, load."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.sandbox import ROOT, Sandbox

REPO = "/srv/app.git"
WORK = "/srv/work"
MANAGER = ("org.bluegreen1", "/org/bluegreen1", "org.bluegreen1.Manager")
GIT_IDENTITY = ["-c", "user.name=Test Author", "-c", "user.email=author@example.com"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_IDENTITY, *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


class App:
    """The sample app's repository inside the sandbox: a work tree and the bare remote."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.work = box.path(WORK)
        self.bare = box.path(REPO)
        self.version = 1

    def create(self) -> str:
        shutil.copytree(ROOT / "examples/app", self.work)
        git(self.work, "init", "-q", "-b", "main")
        git(self.work, "add", ".")
        git(self.work, "commit", "-q", "-m", "First release")
        subprocess.run(["git", "clone", "-q", "--bare", str(self.work), str(self.bare)], check=True)
        return git(self.work, "rev-parse", "HEAD")

    def commit(self, message: str, files: dict[str, str] | None = None) -> str:
        """Commit (a new VERSION unless files are given) and push; return the sha."""
        if files is None:
            self.version += 1
            files = {"VERSION": f"{self.version}\n"}
        for name, text in files.items():
            (self.work / name).write_text(text)
        git(self.work, "add", ".")
        git(self.work, "commit", "-q", "-m", message)
        git(self.work, "push", "-q", str(self.bare), "main")
        return git(self.work, "rev-parse", "HEAD")

    def head(self) -> str:
        return git(self.bare, "rev-parse", "main")

    def revert_to(self, sha: str, message: str) -> str:
        git(self.work, "checkout", "-q", sha, "--", ".")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", str(self.bare), "main")
        return git(self.work, "rev-parse", "HEAD")


# A stand-in for the sample app whose health check a test writes: append "HEALTH = ..."
# (a callable returning a Flask answer; STARTED is when the app was imported).
SCRIPTED_APP = '''import os, time
from flask import Flask, jsonify

app = Flask(__name__)
STARTED = time.monotonic()


@app.get("/")
def index():
    return jsonify(version="scripted", release=os.environ.get("BLUEGREEN_RELEASE"))


@app.get("/slow")
def slow():
    time.sleep(3)
    return jsonify(version="scripted")


@app.get("/health")
def health():
    return HEALTH()
'''


def serving_app(box: Sandbox, extra: str = "", repository: str = "watch = false\n",
                prepare: Callable[[], object] | None = None) -> App:
    """The sample app's repository, bluegreen configured for it (see configure), ``prepare``
    run, bluegreen started, and the first release serving."""
    application = App(box)
    application.create()
    configure(box, extra, repository)
    if prepare is not None:
        prepare()
    box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
    wait_serving(box)
    return application


Value = str | int | float | bool | list[str]


def toml_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        return json.dumps(value)  # a TOML basic string (or array of them) for what a test writes
    return repr(value)


def settings(watch: float | None = 1, *, forwarder: str | None = None, workers: int | None = None,
             interval: float | None = 0.2, top: Mapping[str, Value] | None = None,
             **tables: Mapping[str, Value]) -> str:
    """bluegreen.toml's settings, for configure or serving_app: a post-switch watch of ``watch``
    seconds, health checks every ``interval`` s, ``workers`` per instance, the ``forwarder``
    (None: the setting's default, or left out); more top-level keys in ``top``, more keys of any
    other table as keyword arguments (``health={"timeout": 0.5}``, ``ports={"range": "..."}``)."""
    keys: dict[str, Value] = {}
    if forwarder is not None:
        keys["forwarder"] = forwarder
    if watch is not None:
        keys["post_switch_watch"] = watch
    keys.update(top or {})
    merged: dict[str, dict[str, Value]] = {name: dict(values) for name, values in tables.items()}
    if workers is not None:
        merged["app"] = {"workers": workers, **merged.get("app", {})}
    if interval is not None:
        merged["health"] = {"interval": interval, **merged.get("health", {})}
    lines = [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    for name, values in sorted(merged.items(), key=lambda item: item[0] not in ("app", "health")):
        if not values:
            continue
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "".join(f"{line}\n" for line in lines)


def configure(box: Sandbox, extra: str = "", repository: str = "watch = false\n") -> None:
    """Write bluegreen.toml: top-level keys and other tables in ``extra``, more [repository]
    keys in ``repository`` (by default the refresher is off: the test deploys by itself)."""
    url = "" if "url =" in repository else f'url = "{REPO}"\n'
    box.write("/etc/bluegreen/bluegreen.toml", f"{extra}\n[repository]\n{url}{repository}")


def forwarder_unit(box: Sandbox, port: int) -> str:
    """The unit that carries the public port to ``port``, by the forwarder bluegreen.toml names."""
    text = box.path("/etc/bluegreen/bluegreen.toml").read_text()
    if 'forwarder = "haproxy"' in text:
        return "bluegreen-haproxy.service"
    if 'forwarder = "direct"' in text:  # no forwarder: the instance's listener on the public port
        return f"bluegreen-app-public@{port}.socket"
    kind = "proxy" if 'forwarder = "proxy"' in text else "forward"
    return f"bluegreen-{kind}@{port}.service"


# --- D-Bus, through busctl inside the container ------------------------------------------

def busctl(box: Sandbox, *args: str, check: bool = True,
           user: str | None = None) -> subprocess.CompletedProcess[str]:
    return box.run("busctl", "--system", "--json=short", *args, check=check, user=user)


def unwrap(value: Any) -> Any:
    """busctl's JSON ({"type": ..., "data": ...}) to plain values."""
    if isinstance(value, dict) and set(value) == {"type", "data"}:
        return unwrap(value["data"])
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def call(box: Sandbox, member: str, signature: str = "", *args: str) -> Any:
    out = busctl(box, "call", *MANAGER, member, *([signature, *args] if signature else [])).stdout
    if not out.strip():
        return None  # a method without a reply value
    data = unwrap(json.loads(out))
    return data[0] if len(data) == 1 else data


DBUS_CALL = """\
import asyncio, json, sys
from dbus_next import BusType, Message, Variant
from dbus_next.aio import MessageBus

def value(v):
    if isinstance(v, dict) and "variant" in v:
        return Variant(v["variant"][0], v["variant"][1])
    return v

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    member, signature, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    body = [bytes(b) if s == "ay" else ({k: value(v) for k, v in b.items()} if isinstance(b, dict) else b)
            for s, b in zip([signature] if len(body) == 1 else sys.argv[4:] or [signature], body)]
    reply = await bus.call(Message(destination="org.bluegreen1", path="/org/bluegreen1",
                                   interface="org.bluegreen1.Manager", member=member,
                                   signature=signature, body=body))
    print(json.dumps({"error": reply.error_name or "", "message": str(reply.body[0]) if reply.body else ""}))

asyncio.run(main())
"""


def dbus_error(box: Sandbox, member: str, signature: str, body: list[Any],
               types: list[str] | None = None) -> dict[str, str]:
    """Call a method with exact D-Bus types (busctl would read some arguments as its options)
    and return the error name and message ("" when it succeeded). ``types`` gives the signature
    of each argument when there are several; a dict may hold {"variant": [sig, value]}."""
    out = box.run("python3", "-c", DBUS_CALL, member, signature, json.dumps(body), *(types or [])).stdout
    result: dict[str, str] = json.loads(out)
    return result


def properties(box: Sandbox) -> dict[str, Any]:
    out = busctl(box, "call", MANAGER[0], MANAGER[1], "org.freedesktop.DBus.Properties",
                 "GetAll", "s", MANAGER[2]).stdout
    result: dict[str, Any] = unwrap(json.loads(out))[0]
    return result


def deployment(box: Sandbox, deployment_id: str) -> dict[str, Any]:
    result: dict[str, Any] = call(box, "GetDeployment", "s", deployment_id)
    return result


def wait_deployment(box: Sandbox, deployment_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = deployment(box, deployment_id)
        if record["state"] != "running":
            return record
        time.sleep(0.1)
    raise AssertionError(f"deployment {deployment_id} still running after {timeout} s")


def wait_for_commit(box: Sandbox, sha: str, timeout: float = 60) -> dict[str, Any]:
    """Wait for a deployment of ``sha`` (started by anyone) to finish; return its record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in call(box, "ListDeployments", "u", "5"):
            if record["commit"] == sha and record["state"] != "running":
                result: dict[str, Any] = record
                return result
        time.sleep(0.1)
    raise AssertionError(f"no finished deployment of {sha[:12]} after {timeout} s:\n"
                         f"{box.journal('-u', 'bluegreen.service', '-n', '30')}")


def deploy_new_release(box: Sandbox, app: App, message: str) -> dict[str, Any]:
    """Commit a release, deploy the branch over D-Bus; its record, which succeeded with it."""
    sha = app.commit(message)
    record = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert record["state"] == "succeeded", record
    assert record["commit"] == sha
    return record


def wait_serving(box: Sandbox, timeout: float = 60) -> dict[str, Any]:
    """Wait until bluegreen serves a release and no deployment runs."""
    deadline = time.monotonic() + timeout
    props: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = busctl(box, "call", MANAGER[0], MANAGER[1], "org.freedesktop.DBus.Properties",
                        "GetAll", "s", MANAGER[2], check=False)
        if result.returncode == 0:
            props = unwrap(json.loads(result.stdout))[0]
            if props["State"] == "serving":
                return props
        time.sleep(0.1)
    raise AssertionError(f"bluegreen not serving after {timeout} s: {props}\n"
                         f"{box.journal('-u', 'bluegreen*', '-n', '60')}")


def clone_instance(box: Sandbox, source: int, port: int, **settings: str) -> None:
    """Start an instance on ``port`` with the settings of the one on ``source`` (those named
    changed: BLUEGREEN_KEY=value), as the controller would."""
    edits = {"BLUEGREEN_PORT": str(port), **settings}
    script = " ".join(f"-e 's/^{key}=.*/{key}={value}/'" for key, value in edits.items())
    box.sh(f"sed {script} /run/bluegreen/instances/{source}.env > /run/bluegreen/instances/{port}.env")
    box.run("systemctl", "start", f"bluegreen-app@{port}.service")


def main_pid(box: Sandbox, unit: str) -> int:
    """The unit's main process (0 when it has none: stopped, or between two runs)."""
    return int(box.run("systemctl", "show", "-P", "MainPID", unit).stdout)


def kill_controller(box: Sandbox) -> None:
    pid = main_pid(box, "bluegreen.service")
    # The controller's process dies, as in a crash. (Killing the whole cgroup at once sometimes
    # failed here with "Failed to send signal SIGKILL to auxiliary processes: Input/output
    # error" from systemd, with nothing of bluegreen's making in the way.)
    box.run("systemctl", "kill", "--kill-who=main", "--signal=SIGKILL", "bluegreen.service")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if main_pid(box, "bluegreen.service") not in (0, pid):
            return
        time.sleep(0.1)
    raise AssertionError("systemd did not restart the killed controller")


# --- HTTP, from inside the container's network namespace ---------------------------------

@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


API_SOCKET = "/run/bluegreen/api.sock"


def http(box: Sandbox, method: str, path: str, body: str | bytes | None = None,
         content_type: str | None = "application/json", port: int = 5001, unix: bool = False,
         user: str | None = None, token: str | None = None) -> Response:
    """A request to the HTTP API over TCP (``port``), or over its unix socket (``unix``, as root
    or ``user``, from inside the container: changes go this way)."""
    argv = ["curl", "-s", "-S", "-X", method, "-o", "-", "-w", "\n%{http_code}", "--max-time", "30"]
    argv += ["--unix-socket", API_SOCKET, f"http://localhost{path}"] if unix else [
        f"http://127.0.0.1:{port}{path}"]
    if token is not None:
        argv += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        argv += ["--data-binary", "@-"]
        if content_type:
            argv += ["-H", f"Content-Type: {content_type}"]
    data = body.encode() if isinstance(body, str) else body
    if unix or user:
        inside = box.run(*argv, check=False, user=user, timeout=60,
                         input=data.decode() if data is not None else None)
        returncode, out, err = inside.returncode, inside.stdout, inside.stderr
    else:
        result = subprocess.run(["nsenter", "-t", str(box.leader), "-n", *argv], input=data,
                                capture_output=True, timeout=60)
        returncode, out, err = result.returncode, result.stdout.decode(), result.stderr.decode()
    if returncode != 0:  # no HTTP answer at all (refused, reset, timed out)
        return Response(0, err.strip())
    text, _, status = out.rpartition("\n")
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = text
    return Response(int(status), parsed)


def public(box: Sandbox, path: str = "/") -> dict[str, Any]:
    response = http(box, "GET", path, port=5000)
    assert response.status == 200, response
    result: dict[str, Any] = response.body
    return result


class Load:
    """A load generator (tests/loadgen.py) against the public port while the block runs; its
    JSON report afterwards."""

    SCRIPT = "tests/loadgen.py"

    def __init__(self, box: Sandbox, *args: str) -> None:
        self.box = box
        self.args = args
        self.report: dict[str, Any] = {}

    def __enter__(self) -> Load:
        self.process = self.box.popen_net(["/usr/bin/python3", str(ROOT / self.SCRIPT), *self.args])
        time.sleep(1.0)
        assert self.process.poll() is None, f"{self.SCRIPT} died at start"
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        time.sleep(0.5)
        self.process.send_signal(2)
        out, _err = self.process.communicate(timeout=60)
        if kind is None:  # else the block's own error says more than a missing report
            self.report = json.loads(out)


# Another local user who wants a port of ours: THIEF PORT TRY SERVE tries to bind
# 127.0.0.1:PORT (as a server would, and with SO_REUSEPORT too) every few milliseconds for TRY
# seconds; once it has it, it answers every connection for SERVE seconds. Prints what happened
# as JSON.
THIEF = """
import errno, json, socket, sys, time
port, tries, serves = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
deadline, error = time.monotonic() + tries, ""
while time.monotonic() < deadline:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        break
    except OSError as exc:
        error = errno.errorcode.get(exc.errno, str(exc.errno))
        sock.close()
        time.sleep(0.002)
else:
    print(json.dumps({"bound": False, "error": error}))
    sys.exit(0)
served, until = 0, time.monotonic() + serves
sock.settimeout(0.1)
while time.monotonic() < until:
    try:
        conn, _ = sock.accept()
    except socket.timeout:
        continue
    conn.recv(65536)
    conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Type: application/json\\r\\n\\r\\n"
                 b'{"stranger": true}')
    conn.close()
    served += 1
print(json.dumps({"bound": True, "served": served}))
"""


def stranger_during_restart(box: Sandbox, unit: str, port: int, kill_who: str = "main",
                            seconds: float = 3) -> tuple[dict[str, Any], list[object], list[object]]:
    """SIGKILL ``unit`` while THIEF, as user nobody, tries to bind ``port``, and send requests
    to port 5000 meanwhile: what the stranger got, the answers it gave, the requests that
    failed."""
    answers: list[object] = []
    with ThreadPoolExecutor(1) as pool:
        thief = pool.submit(box.run, "/usr/bin/python3", "-c", THIEF, str(port), str(seconds),
                            str(seconds), user="nobody", timeout=60)
        time.sleep(0.5)  # it is trying
        box.run("systemctl", "kill", f"--kill-who={kill_who}", "--signal=SIGKILL", unit)
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            answers.append(http(box, "GET", "/", port=5000).body)
        outcome: dict[str, Any] = json.loads(thief.result().stdout)
    stolen: list[object] = [answer for answer in answers
                            if isinstance(answer, dict) and "stranger" in answer]
    failed = [answer for answer in answers if not isinstance(answer, dict)]
    print(f"\nanother user tried to bind port {port} while {unit} restarted: {outcome}; "
          f"{len(answers)} requests to port 5000 meanwhile, {len(stolen)} answered by it, "
          f"{len(failed)} failed")
    return outcome, stolen, failed
