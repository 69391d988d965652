from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from bluegreen import apps, config, workers
from bluegreen.config import AppConfig, Config, Network
from bluegreen.release import appenv, transient

ROOT = Path(__file__).resolve().parent.parent.parent
WITH_SECRETS = ROOT / "data" / "with-secrets"


def test_environment_puts_the_release_environment_first_on_path() -> None:
    cfg = Config(app=AppConfig(environment={"DATABASE_URL": "sqlite:////var/lib/bluegreen/data/x.db"}))
    env = appenv.environment(cfg, "c" * 40, Path("/r/c"), Path("/e/k"), 3)
    assert env["PATH"].startswith("/e/k/bin:")
    assert env["BLUEGREEN_PYTHON"] == "/e/k/bin/python3"
    assert env["VIRTUAL_ENV"] == "/e/k"
    assert env["BLUEGREEN_DATA_DIR"] == "/var/lib/bluegreen/data"
    assert env["DATABASE_URL"] == "sqlite:////var/lib/bluegreen/data/x.db"
    assert env["BLUEGREEN_DEPLOYMENT_ID"] == "3"


def test_with_secrets_exports_credentials_and_refuses_reserved_names(tmp_path: Path) -> None:
    (tmp_path / "secrets_SECRET_KEY").write_text("s3cret value\n")
    (tmp_path / "secrets_PATH").write_text("/evil\n")
    (tmp_path / "secrets_BLUEGREEN_RELEASE").write_text("x\n")
    (tmp_path / "secrets_bad-name").write_text("x\n")
    (tmp_path / "github-token").write_text("not an app secret\n")
    result = subprocess.run(
        [str(WITH_SECRETS), "/usr/bin/env"], capture_output=True, text=True, check=True,
        env={"PATH": os.environ["PATH"], "CREDENTIALS_DIRECTORY": str(tmp_path)})
    exported = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert exported["SECRET_KEY"] == "s3cret value"
    assert exported["PATH"] == os.environ["PATH"]
    assert "BLUEGREEN_RELEASE" not in exported
    assert "bad-name" not in result.stdout and "github" not in result.stdout
    assert result.stderr.count("ignored") == 3


def test_with_secrets_refuses_every_name_the_configuration_reserves() -> None:
    script = WITH_SECRETS.read_text()
    patterns = re.search(r'case \$name in\n(.*?)\)\n', script, re.S)
    assert patterns is not None
    refused = patterns[1]
    for name in config.RESERVED_ENVIRONMENT:
        assert name in refused or (name.startswith(("LISTEN_", "WATCHDOG_"))
                                   and name.split("_")[0] + "_*" in refused), name


def test_worker_unit_names() -> None:
    assert workers.unit(8123, "worker") == "bluegreen-worker@8123-worker.service"
    assert workers.parse_unit("bluegreen-worker@8123-mail-out.service") == ("default", 8123, "mail-out")
    assert workers.parse_unit("bluegreen-app@8123.service") is None


def test_worker_units_of_other_apps_carry_the_app() -> None:
    name = workers.unit(8123, "mail-out", "staging")
    assert name == "bluegreen-worker@staging-8123-mail-out.service"
    assert workers.parse_unit(name) == ("staging", 8123, "mail-out")
    # A process type may start with a digit: the port is the first all-digit part.
    assert workers.parse_unit("bluegreen-worker@eu_2-8123-9to5.service") == ("eu_2", 8123, "9to5")


def test_environment_names_the_app_and_its_data_directory() -> None:
    cfg = config.load(Path("/nonexistent"), environ={}, app_name="staging",
                      data_dir=Path("/var/lib/bluegreen/app-data/staging"))
    env = appenv.environment(cfg, "c" * 40, Path("/r/c"), None, 3)
    assert env["BLUEGREEN_APP"] == "staging"
    assert env["BLUEGREEN_DATA_DIR"] == "/var/lib/bluegreen/app-data/staging"
    loaded = Path("/nonexistent")
    assert config.load(loaded, environ={}, data_dir=Path("/d"), app_name="staging").app_name == "staging"


def _with_secrets(credentials: Path, **env: str) -> tuple[dict[str, str], str]:
    result = subprocess.run(
        [str(WITH_SECRETS), "/usr/bin/env"], capture_output=True, text=True, check=True,
        env={"PATH": os.environ["PATH"], "CREDENTIALS_DIRECTORY": str(credentials), **env})
    return dict(line.split("=", 1) for line in result.stdout.splitlines()), result.stderr


def test_with_secrets_exports_the_apps_credentials_under_their_names(tmp_path: Path) -> None:
    # What systemd makes of LoadCredential=secrets_staging:/etc/bluegreen/secrets/staging.
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "secrets_staging_TOKEN").write_text("staging\n")
    (tmp_path / "staging" / "secrets_staging_ONLY_STAGING").write_text("x\n")
    staging, _ = _with_secrets(tmp_path / "staging", BLUEGREEN_APP="staging")
    assert staging["TOKEN"] == "staging" and staging["ONLY_STAGING"] == "x"
    # And of LoadCredential=secrets_TOKEN:/etc/bluegreen/secrets/TOKEN, for the default app.
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "secrets_TOKEN").write_text("production\n")
    default, _ = _with_secrets(tmp_path / "default", BLUEGREEN_APP="default")
    assert default["TOKEN"] == "production"


def test_units_of_an_app_load_its_secrets_and_no_other_apps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apps, "SECRETS_DIR", tmp_path)
    assert appenv.credentials("staging") == []  # no directory: nothing to load
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "TOKEN").write_text("staging\n")
    assert appenv.credentials("staging") == [("secrets_staging", str(tmp_path / "staging"))]
    # The default app's are the files directly in the directory, each loaded on its own: a
    # directory would bring its subdirectories, the other apps' secrets, along.
    (tmp_path / "TOKEN").write_text("production\n")
    (tmp_path / "SECRET_KEY").write_text("k\n")
    (tmp_path / ".TOKEN.swp").write_text("an editor's\n")
    (tmp_path / "LINKED").symlink_to(tmp_path / "staging" / "TOKEN")
    (tmp_path / "50% off").write_text("no name for a unit file\n")
    assert appenv.credentials("default") == [("secrets_SECRET_KEY", str(tmp_path / "SECRET_KEY")),
                                             ("secrets_TOKEN", str(tmp_path / "TOKEN"))]


def test_the_secrets_drop_in_loads_what_the_transient_units_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apps, "SECRETS_DIR", tmp_path)
    (tmp_path / "staging").mkdir()
    (tmp_path / "TOKEN").write_text("production\n")

    def loaded(app: str) -> list[str]:
        text = appenv.secrets_dropin(app)
        assert "[Service]\n" in text
        return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("LoadCredential")]

    assert loaded("default") == [f"secrets_TOKEN:{tmp_path}/TOKEN"]
    assert loaded("staging") == [f"secrets_staging:{tmp_path}/staging"]
    assert loaded("beta") == []  # no directory: nothing to load


def test_network_properties_lock_down_or_open_up() -> None:
    locked = {name: value.value for name, value in transient.network_properties(Network.LOOPBACK)}
    assert locked["IPAddressDeny"] == [[2, bytes(4), 0], [10, bytes(16), 0]]  # any
    assert locked["IPAddressAllow"] == [[2, bytes([127, 0, 0, 0]), 8], [10, bytes(15) + b"\x01", 128]]
    # "any" sets empty lists: that undoes an earlier lockdown of the same unit (runtime drop-in).
    opened = {name: value.value for name, value in transient.network_properties(Network.ANY)}
    assert opened == {"IPAddressDeny": [], "IPAddressAllow": []}


def test_a_build_sees_a_placeholder_for_each_secret_it_is_not_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apps, "SECRETS_DIR", tmp_path)
    for name in ("DJANGO_SECRET_KEY", "API_TOKEN", "SHARED"):
        (tmp_path / name).write_text("the real value\n")
    placeholders = appenv.build_placeholders("default", ["API_TOKEN"], {"SHARED": "a setting"})
    assert placeholders == {"DJANGO_SECRET_KEY": appenv.build_placeholder("DJANGO_SECRET_KEY")}
    assert "the real value" not in appenv.build_placeholder("DJANGO_SECRET_KEY")
