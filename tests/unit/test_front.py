"""The HTTPS front: the domains and [front] settings, the Caddy configuration written from them,
and when the front is started, reloaded or left alone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest

from bluegreen import apps, config, front, maintenance, sockdiag
from bluegreen.config import Config, ConfigError, FrontConfig
from bluegreen.systemd import JobFailed, Systemd, UnitStatus


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_domains_and_the_front_are_read_and_documented(tmp_path: Path) -> None:
    path = write(tmp_path / "bluegreen.toml", """
[app]
domains = ["Blog.Example.com", "www.blog.example.com"]
[front]
email = "ops@example.com"
acme_ca = "https://127.0.0.1:14000/dir"
acme_ca_root = "/etc/ssl/pebble.pem"
""")
    loaded = config.load(path, environ={})
    assert loaded.app.domains == ("blog.example.com", "www.blog.example.com")
    assert loaded.front == FrontConfig("ops@example.com", "https://127.0.0.1:14000/dir",
                                       "/etc/ssl/pebble.pem")
    assert config.to_dict(Config.from_json(loaded.to_json())) == config.to_dict(loaded)
    applies = {key.dotted: key.applies for key in config.KEYS}
    assert applies["app.domains"] == applies["front.email"] == config.Applies.NOW


def test_an_app_with_domains_listens_on_loopback_and_believes_the_front(tmp_path: Path) -> None:
    behind = config.load(write(tmp_path / "a.toml", '[app]\ndomains = ["a.example"]\n'), environ={})
    assert (behind.ports.public_address, behind.app.forwarded_allow_ips) == ("127.0.0.1", "127.0.0.1")
    plain = config.load(write(tmp_path / "b.toml", ""), environ={})
    assert (plain.ports.public_address, plain.app.forwarded_allow_ips) == ("", "")
    # What the file says wins: a public port reachable from elsewhere, say.
    said = config.load(write(tmp_path / "c.toml", '[app]\ndomains = ["a.example"]\n'
                             '[ports]\npublic_address = "::"\n'), environ={})
    assert said.ports.public_address == "::"


@pytest.mark.parametrize(("text", "message"), [
    ('[app]\ndomains = ["localhost"]\n', ":2: app.domains: 'localhost' is not a domain name"),
    ('[app]\ndomains = ["*.example.com"]\n', "'*.example.com' is not a domain name"),
    ('[app]\ndomains = ["192.0.2.1"]\n', "'192.0.2.1' is not a domain name"),
    ('[app]\ndomains = ["-a.example"]\n', "is not a domain name"),
    ('[app]\ndomains = ["a..example"]\n', "is not a domain name"),
    ('[app]\ndomains = ["a.example", "A.example"]\n', "'A.example' is listed twice"),
    ('[app]\ndomains = "a.example"\n', "app.domains: expected a list"),
    ('[front]\nemail = "nobody"\n', "front.email: 'nobody' is not an email address"),
    ('[front]\nacme_ca = "http://ca.example/dir"\n', "front.acme_ca: 'http://ca.example/dir' is not"),
    ('[front]\nacme_ca_root = "ca.pem"\n', "front.acme_ca_root: 'ca.pem' is not an absolute path"),
    ('forwarder = "haproxy"\n[app]\ndomains = ["a.example"]\n', "app.domains: the front needs"),
])
def test_bad_domains_and_front_settings_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        config.load(write(tmp_path / "bluegreen.toml", text), environ={})
    assert message in str(error.value)


def test_a_domain_of_two_apps_is_an_error_naming_both(tmp_path: Path) -> None:
    default = write(tmp_path / "bluegreen.toml", '[app]\ndomains = ["blog.example", "shop.example"]\n')
    staging = write(tmp_path / "apps" / "staging.toml",
                    '[ports]\npublic = 5100\n[app]\ndomains = ["SHOP.example"]\n')
    with pytest.raises(ConfigError) as error:
        apps.load(default, tmp_path / "apps", environ={})
    assert str(error.value) == (
        f"{staging}:4: app.domains: 'shop.example' is a domain of the app default ({default}) "
        "already: the app staging cannot have it too")


def test_front_settings_are_the_hosts(tmp_path: Path) -> None:
    default = write(tmp_path / "bluegreen.toml", "")
    write(tmp_path / "apps" / "staging.toml", '[ports]\npublic = 5100\n[front]\nemail = "a@b.example"\n')
    with pytest.raises(ConfigError, match=r"staging.toml: front: the HTTPS front is the host's"):
        apps.load(default, tmp_path / "apps", environ={})


def proxy_of(route: dict[str, Any]) -> dict[str, Any]:
    """The reverse_proxy handler of a site's route (after its maintenance check)."""
    (subroute,) = route["handle"]
    *_checks, last = subroute["routes"]
    (proxy,) = last["handle"]
    assert proxy["handler"] == "reverse_proxy"
    return dict(proxy)


SITES = [front.Site("default", ("blog.example", "www.blog.example"), 5000),
         front.Site("staging", ("staging.example",), 5100)]


RUN = Path("/run/bluegreen")


def test_the_caddy_configuration_routes_each_domain_to_its_apps_public_port() -> None:
    document = json.loads(front.render(SITES, FrontConfig(
        email="ops@example.com", acme_ca="https://ca.example/dir", acme_ca_root="/etc/ca.pem"),
        RUN))
    assert document["admin"]["listen"].startswith("unix//run/")  # never TCP
    server = document["apps"]["http"]["servers"]["front"]
    assert server["protocols"] == ["h1", "h2"]  # no HTTP/3: a reload would close it
    *sites, last = server["routes"]
    routes = {route["match"][0]["file"]["root"]: proxy_of(route) for route in sites}
    # The domains are files in each app's directory: the configuration does not name them.
    assert list(routes) == ["/run/bluegreen/front/sites/default", "/run/bluegreen/front/sites/staging"]
    assert sites[0]["match"][0]["file"]["try_files"] == ["/{http.request.host}"]
    assert last["handle"][0]["status_code"] == 404  # a name no app has
    proxy = routes["/run/bluegreen/front/sites/staging"]
    assert proxy["upstreams"] == [{"dial": "127.0.0.1:5100"}]
    headers = proxy["headers"]["request"]
    assert headers["set"] == {"X-Forwarded-For": ["{http.request.remote.host}"],
                              "X-Forwarded-Proto": ["{http.request.scheme}"],
                              "X-Forwarded-Host": ["{http.request.host}"]}
    assert "X-Forwarded-Ssl" in headers["delete"]
    # Certificates on demand, for the names the ask endpoint (port 80, loopback) finds.
    automation = document["apps"]["tls"]["automation"]
    (policy,) = automation["policies"]
    assert policy["on_demand"] is True and "subjects" not in policy
    assert automation["on_demand"] == {"ask": "http://127.0.0.1:80/.well-known/bluegreen/ask"}
    assert policy["issuers"] == [{"module": "acme", "ca": "https://ca.example/dir",
                                  "email": "ops@example.com",
                                  "trusted_roots_pem_files": ["/etc/ca.pem"]}]
    plain = document["apps"]["http"]["servers"]["plain"]
    ask, redirect, _ = plain["routes"]
    assert ask["match"][0]["remote_ip"] == {"ranges": ["127.0.0.0/8", "::1/128"]}
    assert ask["handle"][0]["routes"][0]["match"] == [{"file": {
        "root": "/run/bluegreen/front/names", "try_files": ["/{http.request.uri.query.domain}"]}}]
    assert redirect["handle"][0]["status_code"] == 308
    default_ca = json.loads(front.render(SITES, FrontConfig(), RUN))
    assert default_ca["apps"]["tls"]["automation"]["policies"][0]["issuers"] == [
        {"module": "acme", "ca": config.LETSENCRYPT}]


def test_domains_are_files_that_follow_the_settings(tmp_path: Path) -> None:
    sites, names = front.sites_directory(tmp_path), front.names_directory(tmp_path)

    def files() -> tuple[dict[str, list[str]], list[str]]:
        return ({app.name: sorted(f.name for f in app.iterdir()) for app in sorted(sites.iterdir())},
                sorted(f.name for f in names.iterdir()))

    assert front.publish(tmp_path, SITES) == (["blog.example", "www.blog.example",
                                               "staging.example"], [])
    assert files() == ({"default": ["blog.example", "www.blog.example"],
                        "staging": ["staging.example"]},
                       ["blog.example", "staging.example", "www.blog.example"])
    assert front.publish(tmp_path, SITES) == ([], [])
    # www moves to staging; blog goes; staging's app loses its domain and the app goes.
    moved = [front.Site("default", ("new.example",), 5000),
             front.Site("staging", ("staging.example", "www.blog.example"), 5100)]
    assert front.publish(tmp_path, moved) == (["new.example", "www.blog.example"], ["blog.example"])
    assert files() == ({"default": ["new.example"], "staging": ["staging.example", "www.blog.example"]},
                       ["new.example", "staging.example", "www.blog.example"])
    assert front.publish(tmp_path, moved[:1]) == ([], ["staging.example", "www.blog.example"])
    assert files() == ({"default": ["new.example"]}, ["new.example"])


def test_an_app_moving_to_another_public_port_is_reached_on_either_during_the_move() -> None:
    """After a reload sets ports.public, the deploy that applies it switches to the new port
    and closes the old one; the front must not wait for the deploy's end to find it."""
    moving = front.Site("staging", ("staging.example",), 5100, next_port=5200)
    route = json.loads(front.render([moving], FrontConfig(), RUN))["apps"]["http"]["servers"]["front"]
    proxy = proxy_of(route["routes"][0])
    assert proxy["upstreams"] == [{"dial": "127.0.0.1:5100"}, {"dial": "127.0.0.1:5200"}]
    assert proxy["load_balancing"]["selection_policy"] == {"policy": "first"}
    assert proxy["health_checks"]["passive"]["max_fails"] == 1  # a refused dial: the next one
    settled = front.Site("staging", ("staging.example",), 5200, next_port=5200)
    proxy = proxy_of(json.loads(front.render([settled], FrontConfig(), RUN))["apps"]["http"][
        "servers"]["front"]["routes"][0])
    assert proxy["upstreams"] == [{"dial": "127.0.0.1:5200"}] and "health_checks" not in proxy


def test_maintenance_is_a_file_the_front_looks_for_on_each_request(tmp_path: Path) -> None:
    """Turning maintenance on or off changes no configuration: the front is not reloaded."""
    page = maintenance.page("staging", tmp_path)
    site = front.Site("staging", ("staging.example",), 5100, maintenance_page=page)
    server = json.loads(front.render([site], FrontConfig(), RUN))["apps"]["http"]["servers"]["front"]
    (check, _proxy) = server["routes"][0]["handle"][0]["routes"]
    assert check["match"] == [{"file": {"root": str(tmp_path / "maintenance"),
                                        "try_files": ["/staging.html"]}}]
    assert check["handle"] == [{"handler": "error", "status_code": 503, "error": "maintenance"}]
    (answer,) = server["errors"]["routes"]
    assert answer["match"] == server["routes"][0]["match"]  # the app's domains
    handlers = answer["handle"][0]["routes"][0]["handle"]
    assert handlers[0]["response"]["set"]["Retry-After"] == [str(maintenance.RETRY_AFTER)]
    assert "If-None-Match" in handlers[0]["request"]["delete"]  # never a 304 for the page
    assert handlers[-1] == {"handler": "file_server", "root": str(tmp_path / "maintenance")}
    assert "errors" not in json.loads(front.render([front.Site("a", ("a.example",), 5000)],
                                                   FrontConfig(), RUN))["apps"]["http"]["servers"]["front"]


class FakeSystemd:
    def __init__(self, running: bool = False, fail: str = "") -> None:
        self.running = running
        self.fail = fail
        self.jobs: list[str] = []

    async def status(self, unit: str) -> UnitStatus:
        return UnitStatus(unit, "active" if self.running else "inactive", "")

    async def _job(self, verb: str, unit: str) -> None:
        self.jobs.append(f"{verb} {unit}")
        if verb == self.fail:
            raise JobFailed(unit, verb, "failed")
        self.running = verb != "stop"

    async def start_unit(self, unit: str, **_: Any) -> None:
        await self._job("start", unit)

    async def reload_unit(self, unit: str, **_: Any) -> None:
        await self._job("reload", unit)

    async def stop_unit(self, unit: str, **_: Any) -> None:
        await self._job("stop", unit)

    async def reset_failed(self, unit: str) -> None:
        self.jobs.append(f"reset-failed {unit}")


def apply(systemd: FakeSystemd, run_dir: Path, sites: list[front.Site],
          settings: FrontConfig | None = None) -> str:
    return asyncio.run(front.apply(cast(Systemd, systemd), run_dir, sites, settings or FrontConfig()))


def test_the_front_is_reloaded_only_when_its_configuration_changes(tmp_path: Path) -> None:
    systemd = FakeSystemd()
    no_domains = [front.Site("default", (), 5000), front.Site("staging", (), 5100)]
    assert apply(systemd, tmp_path, no_domains) == "none"  # no domains, no front
    assert apply(systemd, tmp_path, SITES) == "started"
    assert (tmp_path / "front.json").read_text() == front.render(SITES, FrontConfig(), tmp_path)
    assert apply(systemd, tmp_path, SITES) == "unchanged"
    fewer = [SITES[0], front.Site("staging", (), 5100)]
    assert apply(systemd, tmp_path, fewer) == "domains"  # a file less, no reload
    assert not (front.sites_directory(tmp_path) / "staging" / "staging.example").exists()
    assert apply(systemd, tmp_path, SITES[:1]) == "reloaded"  # an app less
    assert apply(systemd, tmp_path, SITES[:1], FrontConfig(email="a@b.example")) == "reloaded"
    assert apply(systemd, tmp_path, []) == "stopped"
    assert not (tmp_path / "front.json").exists()
    assert list(front.names_directory(tmp_path).iterdir()) == []
    assert systemd.jobs == ["reset-failed bluegreen-front.service", "start bluegreen-front.service",
                            "reload bluegreen-front.service",
                            "reload bluegreen-front.service", "stop bluegreen-front.service"]


def test_a_front_that_refuses_new_settings_keeps_the_old_ones_on_file(tmp_path: Path) -> None:
    systemd = FakeSystemd(running=True, fail="reload")
    (tmp_path / "front.json").write_text(front.render(SITES, FrontConfig(), tmp_path))
    assert apply(systemd, tmp_path, SITES[:1]) == "failed"
    assert (tmp_path / "front.json").read_text() == front.render(SITES, FrontConfig(), tmp_path)


def test_a_port_held_by_another_process_is_named() -> None:
    def listening(port: int) -> list[sockdiag.TcpSocket]:
        return [sockdiag.TcpSocket("0.0.0.0", port, "0.0.0.0", 0, sockdiag.TcpState.LISTEN, 0, 0, 1)
                ] if port == 80 else []
    assert front.holders(listening) == "port 80 on 0.0.0.0 is held by a process of user root (uid 0)"
    assert front.holders(lambda port: []) == ""


def test_after_each_deploy_the_front_follows_the_public_ports() -> None:
    follows: list[str] = []

    async def follow() -> None:
        follows.append("follow")

    async def deploy_finishes() -> None:
        observer = front.AfterDeploy(follow)
        observer.finished(cast(Any, None))
        await asyncio.gather(*observer.tasks)

    asyncio.run(deploy_finishes())
    assert follows == ["follow"]
