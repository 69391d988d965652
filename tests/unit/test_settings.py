"""Which settings of the file are pending, and the deploy-time settings kept with the records."""

from __future__ import annotations

from pathlib import Path

from bluegreen import config, settings
from bluegreen.config import Config
from bluegreen.history import History


def test_pending_until_deploy_lists_only_keys_that_wait_for_a_deploy() -> None:
    deployed = Config()
    loaded = config.load_mapping({"app": {"environment": {"A": "1"}}, "health": {"timeout": 1}},
                                 source="x")
    effective = config.with_deployed(loaded, deployed)
    assert settings.pending_until_deploy(effective, loaded) == [
        ("app.environment", "at the next deploy")]
    assert settings.pending_until_deploy(loaded, loaded) == []


def test_deploy_time_settings_survive_in_the_records(tmp_path: Path) -> None:
    history = History(tmp_path / "bluegreen.db")
    assert settings.load_deployed(history) is None
    deployed = config.load_mapping({"app": {"workers": 7}, "processes": {"w": "run"}}, source="x")
    settings.save_deployed(history, deployed)
    assert config.changed(settings.load_deployed(history) or Config(), deployed) == []
    history.set_value(settings.DEPLOYED, "{not json")
    assert settings.load_deployed(history) is None


def test_a_listener_on_a_host_name_is_compared_by_port() -> None:
    assert settings._same_host("127.0.0.1", "127.0.0.1")
    assert settings._same_host("::1", "0:0::1")
    assert not settings._same_host("127.0.0.1", "127.0.0.2")
    assert settings._same_host("127.0.0.1", "localhost")
