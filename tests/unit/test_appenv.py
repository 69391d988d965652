from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from bluegreen import appenv, apps, config, transient, workers
from bluegreen.config import AppConfig, Config, Network

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
    assert "staging" not in env["BLUEGREEN_OTHER_APPS"].split()
    loaded = Path("/nonexistent")
    assert config.load(loaded, environ={}, data_dir=Path("/d"), app_name="staging").app_name == "staging"


def _with_secrets(credentials: Path, **env: str) -> tuple[dict[str, str], str]:
    result = subprocess.run(
        [str(WITH_SECRETS), "/usr/bin/env"], capture_output=True, text=True, check=True,
        env={"PATH": os.environ["PATH"], "CREDENTIALS_DIRECTORY": str(credentials), **env})
    return dict(line.split("=", 1) for line in result.stdout.splitlines()), result.stderr


def test_with_secrets_gives_each_app_its_own_secrets(tmp_path: Path) -> None:
    # What systemd makes of /etc/bluegreen/secrets/{TOKEN,staging/TOKEN,staging/ONLY_STAGING}:
    # the default app's units load the directory with its subdirectory.
    (tmp_path / "secrets_TOKEN").write_text("production\n")
    (tmp_path / "secrets_staging_TOKEN").write_text("staging\n")
    (tmp_path / "secrets_staging_ONLY_STAGING").write_text("x\n")
    default, _ = _with_secrets(tmp_path, BLUEGREEN_APP="default", BLUEGREEN_OTHER_APPS="beta staging")
    assert default["TOKEN"] == "production"
    assert not any(name.startswith("staging_") for name in default)
    staging, _ = _with_secrets(tmp_path, BLUEGREEN_APP="staging")
    assert staging["TOKEN"] == "staging" and staging["ONLY_STAGING"] == "x"
    other, _ = _with_secrets(tmp_path, BLUEGREEN_APP="beta")
    assert "TOKEN" not in other and "ONLY_STAGING" not in other


def test_an_app_named_like_another_plus_a_suffix_keeps_its_secrets_to_itself(tmp_path: Path) -> None:
    """secrets/staging/TOKEN and secrets/staging_eu/TOKEN are the credentials secrets_staging_TOKEN
    and secrets_staging_eu_TOKEN: staging must not take the second as "eu_TOKEN"."""
    (tmp_path / "secrets_staging_TOKEN").write_text("staging\n")
    (tmp_path / "secrets_staging_eu_TOKEN").write_text("eu\n")
    staging, _ = _with_secrets(tmp_path, BLUEGREEN_APP="staging", BLUEGREEN_OTHER_APPS="staging_eu")
    assert staging["TOKEN"] == "staging" and "eu_TOKEN" not in staging
    eu, _ = _with_secrets(tmp_path, BLUEGREEN_APP="staging_eu", BLUEGREEN_OTHER_APPS="staging")
    assert eu["TOKEN"] == "eu"
    default, _ = _with_secrets(tmp_path, BLUEGREEN_APP="default", BLUEGREEN_OTHER_APPS="staging staging_eu")
    assert not any(name.startswith("staging") for name in default)


def test_transient_units_of_an_app_load_its_secrets_under_its_own_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apps, "SECRETS_DIR", tmp_path)
    assert appenv.credentials("staging") == []  # no directory: nothing to load
    (tmp_path / "staging").mkdir()
    assert appenv.credentials("staging") == [("secrets_staging", str(tmp_path / "staging"))]
    assert appenv.credentials("default") == [("secrets", str(tmp_path))]


def test_network_properties_lock_down_or_open_up() -> None:
    locked = {name: value.value for name, value in transient.network_properties(Network.LOOPBACK)}
    assert locked["IPAddressDeny"] == [[2, bytes(4), 0], [10, bytes(16), 0]]  # any
    assert locked["IPAddressAllow"] == [[2, bytes([127, 0, 0, 0]), 8], [10, bytes(15) + b"\x01", 128]]
    # "any" sets empty lists: that undoes an earlier lockdown of the same unit (runtime drop-in).
    opened = {name: value.value for name, value in transient.network_properties(Network.ANY)}
    assert opened == {"IPAddressDeny": [], "IPAddressAllow": []}
