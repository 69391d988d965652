"""App files: names, places, and what an app's file may not say."""

from __future__ import annotations

from pathlib import Path

import pytest

from bluegreen import apps
from bluegreen.config import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["staging", "shop_eu", "a", "app2"])
def test_app_names_that_are_valid(name: str) -> None:
    assert apps.name_problem(name) is None


@pytest.mark.parametrize("name", ["default", "Staging", "2app", "my-app", "a.b", "", "x" * 33, "é"])
def test_app_names_that_are_refused(name: str) -> None:
    assert apps.name_problem(name)


def test_the_default_app_keeps_its_places_and_the_others_get_their_own() -> None:
    assert apps.state_dir("default") == Path("/var/lib/bluegreen")
    assert apps.state_dir("staging") == Path("/var/lib/bluegreen/apps/staging")
    assert apps.secrets_dir("default") == Path("/etc/bluegreen/secrets")
    assert apps.secrets_dir("staging") == Path("/etc/bluegreen/secrets/staging")
    assert apps.data_dir("default") == Path("/var/lib/bluegreen/data")
    assert apps.data_dir("staging") == Path("/var/lib/bluegreen/app-data/staging")


def test_load_reads_every_app_file(tmp_path: Path) -> None:
    default = write(tmp_path / "bluegreen.toml", '[repository]\nurl = "/srv/prod.git"\n')
    write(tmp_path / "apps" / "staging.toml",
          '[repository]\nurl = "/srv/staging.git"\n[ports]\npublic = 5100\n'
          '[app.environment]\nDB = "{data_dir}/db.sqlite"\n')
    configs = apps.load(default, tmp_path / "apps", environ={"TEAM_REPO_URL": "/srv/env.git"})
    assert list(configs) == ["default", "staging"]
    assert configs["default"].repository.url == "/srv/env.git"  # the environment: the default app's
    staging = configs["staging"]
    assert staging.app_name == "staging"
    assert (staging.repository.url, staging.ports.public) == ("/srv/staging.git", 5100)
    assert staging.app.environment["DB"] == "/var/lib/bluegreen/app-data/staging/db.sqlite"


def test_a_missing_apps_directory_is_the_default_app_alone(tmp_path: Path) -> None:
    assert list(apps.load(tmp_path / "bluegreen.toml", tmp_path / "apps", environ={})) == ["default"]


def test_two_apps_on_one_public_port_is_an_error_naming_both_files(tmp_path: Path) -> None:
    default = write(tmp_path / "bluegreen.toml", "[ports]\npublic = 5100\n")
    staging = write(tmp_path / "apps" / "staging.toml", "# staging\n[ports]\npublic = 5100\n")
    with pytest.raises(ConfigError) as error:
        apps.load(default, tmp_path / "apps", environ={})
    assert str(error.value).startswith(f"{staging}:3: ports.public: 5100 ")
    assert str(default) in str(error.value)


def test_a_public_port_in_another_apps_range_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "apps" / "staging.toml", "[ports]\npublic = 8500\nrange = \"9000-9100\"\n")
    with pytest.raises(ConfigError, match=r"staging.toml:2: ports.public: 8500 lies inside ports.range "
                       r"8000-8999 of the app default"):
        apps.load(tmp_path / "bluegreen.toml", tmp_path / "apps", environ={})


def test_a_bad_app_file_name_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "apps" / "My-App.toml", "")
    with pytest.raises(ConfigError, match=r"My-App\.toml: not an app name"):
        apps.load(tmp_path / "bluegreen.toml", tmp_path / "apps", environ={})


@pytest.mark.parametrize(("text", "message"), [
    ('[api]\nlisten = "127.0.0.1:6001"\n', r"staging.toml:2: api.listen: the HTTP API is the host's"),
    ('forwarder = "haproxy"\n[ports]\npublic = 5100\n',
     r"staging.toml:1: forwarder: \"haproxy\" serves the default app only"),
    ("[ports]\npublic = 'x'\n", r"staging.toml:2: ports.public: expected an integer"),
])
def test_what_an_app_file_may_not_say(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path / "apps" / "staging.toml", text)
    with pytest.raises(ConfigError, match=message):
        apps.load(tmp_path / "bluegreen.toml", tmp_path / "apps", environ={})


def test_a_public_port_another_app_serves_is_refused_naming_both(tmp_path: Path) -> None:
    """A moves from 5000 to 6000 (at its next deploy: 5000 still serves it) while B takes 5000."""
    write(tmp_path / "bluegreen.toml", "[ports]\npublic = 6000\n")
    write(tmp_path / "apps" / "beta.toml", "# beta\n[ports]\npublic = 5000\n")
    configs = apps.load(tmp_path / "bluegreen.toml", tmp_path / "apps", environ={})
    with pytest.raises(ConfigError, match=r"beta.toml:3: ports.public: the app beta cannot take port "
                       r"5000: the app default still serves on it"):
        apps.check_served_ports(configs, {"default": {5000}, "beta": set()})
    apps.check_served_ports(configs, {"default": {6000}, "beta": {5000}})  # each its own
    apps.check_served_ports(configs, {"default": set(), "beta": set()})  # nothing serves yet


def test_the_user_of_a_port_is_another_app_serving_it() -> None:
    served = {"default": {5000, 6000}, "beta": {5100}}
    assert apps.port_user("beta", 6000, served) == "default"
    assert apps.port_user("default", 6000, served) is None  # its own
    assert apps.port_user("beta", 7000, served) is None
