from __future__ import annotations

from pathlib import Path

from bluegreen.generator import generate


def test_no_drop_in_for_the_default_address(tmp_path: Path) -> None:
    config = tmp_path / "bluegreen.toml"
    config.write_text('[api]\nlisten = "127.0.0.1:5001"\n')
    assert not generate(tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_api_listen_becomes_a_socket_drop_in(tmp_path: Path) -> None:
    config = tmp_path / "bluegreen.toml"
    config.write_text('[api]\nlisten = "[::1]:7001"\n')
    assert generate(tmp_path / "out", config)
    dropin = (tmp_path / "out/bluegreen-api.socket.d/50-listen.conf").read_text()
    assert "[Socket]\nListenStream=\nListenStream=[::1]:7001\n" in dropin


def test_a_broken_config_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "bluegreen.toml"
    config.write_text('[api]\nlisten = "everywhere"\n')
    assert not generate(tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
