from __future__ import annotations

from pathlib import Path

from bluegreen.generator import generate

TOKEN_DROP_IN = "bluegreen-api.service.d/50-token.conf"


def test_no_drop_in_for_the_default_address_without_a_token(tmp_path: Path) -> None:
    config = tmp_path / "bluegreen.toml"
    config.write_text('[api]\nlisten = "127.0.0.1:5001"\n')
    assert not generate(tmp_path / "out", config, tmp_path / "api-token")
    assert not (tmp_path / "out").exists()


def test_api_listen_becomes_a_socket_drop_in_that_keeps_the_unix_socket(tmp_path: Path) -> None:
    config = tmp_path / "bluegreen.toml"
    config.write_text('[api]\nlisten = "[::1]:7001"\n')
    assert generate(tmp_path / "out", config, tmp_path / "api-token")
    dropin = (tmp_path / "out/bluegreen-api.socket.d/50-listen.conf").read_text()
    assert ("[Socket]\nListenStream=\nListenStream=/run/bluegreen/api.sock\n"
            "ListenStream=[::1]:7001\n") in dropin
    assert not (tmp_path / "out" / TOKEN_DROP_IN).exists()  # loopback: the API starts without one


def test_an_existing_token_is_loaded_on_loopback_too(tmp_path: Path) -> None:
    config = tmp_path / "bluegreen.toml"
    config.write_text("")
    token = tmp_path / "api-token"
    token.write_text("secret\n")
    assert generate(tmp_path / "out", config, token)
    assert f"LoadCredential=api-token:{token}\n" in (tmp_path / "out" / TOKEN_DROP_IN).read_text()
    assert not (tmp_path / "out/bluegreen-api.socket.d").exists()


def test_beyond_loopback_the_token_is_required(tmp_path: Path) -> None:
    config = tmp_path / "bluegreen.toml"
    config.write_text('[api]\nlisten = "0.0.0.0:5002"\n')
    assert generate(tmp_path / "out", config, tmp_path / "api-token")
    assert "LoadCredential=api-token:" in (tmp_path / "out" / TOKEN_DROP_IN).read_text()


def test_a_broken_config_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "bluegreen.toml"
    config.write_text('[api]\nlisten = "everywhere"\n')
    assert not generate(tmp_path / "out", config, tmp_path / "api-token")
    assert not (tmp_path / "out").exists()
