from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bluegreen import config
from bluegreen import config as config_module
from bluegreen.config import Config, ConfigError, ListenAddress, PortRange


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bluegreen.toml"
    path.write_text(text)
    return path


def test_a_missing_file_means_defaults(tmp_path: Path) -> None:
    loaded = config.load(tmp_path / "absent.toml", environ={})
    assert loaded.repository.branch == "main"
    assert loaded.repository.poll_interval == 10
    assert loaded.app.wsgi == ""  # the Procfile's web line names it, else app:app (deploy.py)
    assert loaded.app.health_path == ""  # /health, else / (health.py)
    assert loaded.ports.public == 5000
    assert loaded.ports.range == PortRange(8000, 8999)
    assert (loaded.ports.public_address, loaded.ports.max_connections) == ("", 1024)
    assert loaded.app.forwarded_allow_ips == ""  # X-Forwarded-* believed from nobody
    assert loaded.api.listen == ListenAddress("127.0.0.1", 5001)
    assert loaded.drain_timeout == 30


def test_every_documented_key_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, """
drain_timeout = 12
[repository]
url = "https://example.com/app.git"
branch = "production"
poll_interval = 30
[app]
wsgi = "service.wsgi:application"
health_path = "/healthz"
workers = 3
worker_class = "gthread"
team = "7"
forwarded_allow_ips = "127.0.0.1, ::1"
[ports]
public = 8080
range = "9000-9100"
public_address = "127.0.0.1"
max_connections = 200
[api]
listen = "[::1]:6001"
[health]
interval = 0.5
timeout = 1
healthy_threshold = 3
unhealthy_threshold = 4
deadline = 20
""")
    loaded = config.load(path, environ={})
    assert loaded.drain_timeout == 12
    assert loaded.repository.url == "https://example.com/app.git"
    assert loaded.repository.branch == "production"
    assert loaded.app.workers == 3 and loaded.app.worker_class == "gthread"
    assert loaded.ports.public == 8080 and loaded.ports.range == PortRange(9000, 9100)
    assert loaded.ports.public_address == "127.0.0.1" and loaded.ports.max_connections == 200
    assert loaded.app.forwarded_allow_ips == "127.0.0.1,::1"
    assert loaded.api.listen == ListenAddress("::1", 6001)
    assert not ListenAddress("0.0.0.0", 1).is_loopback and loaded.api.listen.is_loopback
    assert loaded.health.healthy_threshold == 3 and loaded.health.deadline == 20


def test_the_shipped_config_file_is_valid_and_matches_the_defaults() -> None:
    shipped = Path(__file__).resolve().parents[2] / "data" / "bluegreen.toml"
    loaded = config.load(shipped, environ={})
    assert config.to_dict(loaded) == config.to_dict(Config())
    text = shipped.read_text()
    for key in config.KEYS:
        documented = f"#[{key.dotted}]" in text or f"#{key.name} = " in text
        assert documented, f"{key.dotted} is not documented in bluegreen.toml"


@pytest.mark.parametrize(("text", "message"), [
    ("[repository]\nurl = \"x\"\nbranchh = \"main\"\n", ":3: repository.branchh: unknown key"),
    ("[nonsense]\nx = 1\n", "nonsense: unknown section"),
    ("[app]\nworkers = 0\n", ":2: app.workers: must be between 1 and 64"),
    ("[app]\nworkers = \"two\"\n", "app.workers: expected an integer, got str"),
    ("[ports]\nrange = \"9000-8000\"\n", "ports.range"),
    ("[ports]\npublic = 8500\n", "ports.public: 8500 lies inside ports.range"),
    ("[ports]\npublic_address = \"localhost\"\n", ":2: ports.public_address: 'localhost' is not an IPv4"),
    ("[ports]\npublic_address = \"[::1]\"\n", "ports.public_address: '[::1]' is not"),
    ("[ports]\nmax_connections = 0\n", "ports.max_connections: must be between 1 and 65536"),
    ("[app]\nforwarded_allow_ips = \"10.0.0.0/8\"\n", ":2: app.forwarded_allow_ips: '10.0.0.0/8' is not"),
    ("[app]\nforwarded_allow_ips = \"*\"\n", "app.forwarded_allow_ips: '*' is not an IP address"),
    ("[app]\nforwarded_allow_ips = [\"127.0.0.1\"]\n", "app.forwarded_allow_ips: expected a string"),
    ("[api]\nlisten = \"nowhere\"\n", "api.listen: 'nowhere' is not HOST:PORT"),
    ("[health]\ninterval = true\n", "health.interval: expected a number"),
    ("[repository]\nurl = \"--upload-pack=evil\"\n", "repository.url"),
    ("drain_timeout = 601\n", "drain_timeout: must be between 0 and 600"),
    ("[app\n", "bluegreen.toml:1: Expected ']' at the end of a table declaration"),
    ("[health]\ninterval = 1\ntimeout = = 3\n", "bluegreen.toml:3: health.timeout: Invalid value"),
    ("repository = 5\n", "[repository] must be a table"),
])
def test_bad_config_names_file_line_key_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        config.load(path, environ={})
    assert str(error.value).startswith(str(path))
    assert message in str(error.value)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[repository]\nurl = "https://example.com/{team}.git"\npoll_interval = 60\n')
    loaded = config.load(path, environ={"CODE_REFRESH_INTERVAL": "5", "TEAM_NUMBER": "42"})
    assert loaded.repository.poll_interval == 5
    assert loaded.app.team == "42"
    assert loaded.repository.url == "https://example.com/42.git"
    loaded = config.load(path, environ={"TEAM_REPO_URL": "/srv/other.git"})
    assert loaded.repository.url == "/srv/other.git"


def test_a_bad_environment_value_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CODE_REFRESH_INTERVAL"):
        config.load(tmp_path / "absent.toml", environ={"CODE_REFRESH_INTERVAL": "often"})


def test_json_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, '[ports]\nrange = "8100-8200"\n[api]\nlisten = "[::1]:7000"\n')
    loaded = config.load(path, environ={})
    again = Config.from_json(loaded.to_json())
    assert config.to_dict(again) == config.to_dict(loaded)


@given(st.text(max_size=30))
def test_port_range_parser_accepts_or_explains(text: str) -> None:
    try:
        parsed = config.parse_port_range(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert 1024 <= parsed.first < parsed.last <= 65535
        assert config.parse_port_range(str(parsed)) == parsed


@given(st.integers(1024, 65534), st.integers(1, 1000))
def test_valid_port_ranges_round_trip(first: int, width: int) -> None:
    last = min(first + width, 65535)
    parsed = config.parse_port_range(f"{first}-{last}")
    assert (parsed.first, parsed.last, len(parsed)) == (first, last, last - first + 1)


@given(st.text(max_size=40))
def test_listen_address_parser_accepts_or_explains(text: str) -> None:
    try:
        parsed = config.parse_listen_address(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert config.parse_listen_address(str(parsed)) == parsed


def test_the_package_version_is_the_python_version() -> None:
    import bluegreen

    changelog = (Path(__file__).resolve().parents[2] / "packaging/debian/changelog").read_text()
    assert changelog.startswith(f"bluegreen ({bluegreen.__version__})")


def test_the_manual_documents_every_key() -> None:
    manual = (Path(__file__).resolve().parents[2] / "man/bluegreen.toml.5").read_text()
    for key in config.KEYS:
        assert f"\\fB{key.name}\\fR = " in manual, f"{key.dotted} is missing from bluegreen.toml(5)"


def test_environment_and_processes_tables(tmp_path: Path) -> None:
    path = tmp_path / "bluegreen.toml"
    path.write_text('[app]\nnetwork = "loopback"\nhealth_host = "example.com"\n'
                    '[app.environment]\nDATABASE_URL = "sqlite:///{data_dir}/notes.db"\n'
                    '[release]\nmigrate_command = "alembic upgrade head"\n'
                    '[processes]\nworker = "python worker.py"\n')
    loaded = config_module.load(path, environ={})
    assert loaded.app.environment == {"DATABASE_URL": "sqlite:////var/lib/bluegreen/data/notes.db"}
    assert loaded.app.network == "loopback"
    assert loaded.app.health_host == "example.com"
    assert loaded.release.migrate_command == "alembic upgrade head"
    assert loaded.processes == {"worker": "python worker.py"}


@pytest.mark.parametrize("text, message", [
    ('[app.environment]\nPATH = "/x"\n', ":2: app.environment.PATH: PATH is set by bluegreen"),
    ('[app.environment]\nA = "1"\nBLUEGREEN_PORT = "1"\n', ":3: app.environment.BLUEGREEN_PORT:"),
    ('[app.environment]\n1A = "1"\n', ":2: app.environment.1A: not a valid environment variable"),
    ('[app.environment]\nA = 1\n', ':2: app.environment.A: expected a string (quote it: A = "1")'),
    ('[app]\nenvironment = 3\n', ":2: app.environment: expected a table"),
    ('[processes]\nweb = "gunicorn"\n', ":2: processes.web: 'web' is not a worker"),
    ('[processes]\n"a b" = "x"\n', "processes.a b: not a process name"),
    ('[app]\nnetwork = "none"\n', ":2: app.network:"),
    ('forwarder = "proxy"\n[app]\ninstances = 2\n', ':3: app.instances: more than one instance '
     'needs forwarder = "socat"'),
    ('[app]\ninstances = 17\n', ":2: app.instances:"),
])
def test_bad_tables_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bluegreen.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        config_module.load(path, environ={})
    assert str(error.value).startswith(str(path)), error.value
    assert message in str(error.value), error.value


def test_ssh_known_hosts_wants_known_hosts_lines(tmp_path: Path) -> None:
    path = tmp_path / "bluegreen.toml"
    line = "[git.example.com]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB"
    path.write_text(f'[repository]\nssh_known_hosts = """\n# pinned\n{line}\n"""\n')
    assert line in config.load(path).repository.ssh_known_hosts
    path.write_text('[repository]\nssh_known_hosts = "git.example.com"\n')
    with pytest.raises(ConfigError, match=r"bluegreen\.toml:2: repository\.ssh_known_hosts: line 1"):
        config.load(path)


def test_every_key_says_when_a_change_applies() -> None:
    applies = {key.dotted: key.applies for key in config.KEYS}  # a key left out raises KeyError
    assert applies["app.workers"] == config.Applies.NEXT_DEPLOY
    assert applies["ports.public"] == applies["forwarder"] == config.Applies.NEXT_DEPLOY
    assert applies["health.interval"] == applies["drain_timeout"] == config.Applies.NOW
    assert applies["api.listen"] == config.Applies.API_SOCKET


def test_with_deployed_keeps_the_deploy_time_keys_only() -> None:
    deployed = Config()
    new = config.load_mapping({"app": {"workers": 5}, "ports": {"public": 6000},
                               "forwarder": "proxy", "health": {"interval": 0.5},
                               "drain_timeout": 7}, source="x")
    effective = config.with_deployed(new, deployed)
    assert (effective.app.workers, effective.ports.public, effective.forwarder) == (2, 5000, "socat")
    assert (effective.health.interval, effective.drain_timeout) == (0.5, 7)
    assert {key.dotted for key in config.changed(effective, new)} == {
        "app.workers", "ports.public", "forwarder"}
    assert config.changed(new, new) == []


def test_app_asgi_names_an_asgi_app_and_excludes_app_wsgi(tmp_path: Path) -> None:
    path = tmp_path / "bluegreen.toml"
    path.write_text('[app]\nasgi = "service.main:app"\n')
    assert config_module.load(path, environ={}).app.asgi == "service.main:app"
    assert config_module.load(path, environ={}).app.wsgi == ""
    path.write_text('[app]\nwsgi = "app:app"\nasgi = "service.main:app"\n')
    with pytest.raises(ConfigError, match=r":3: app.asgi: app.wsgi names the app already"):
        config_module.load(path, environ={})
    path.write_text('[app]\nasgi = "main"\n')
    with pytest.raises(ConfigError, match=r":2: app.asgi: .*MODULE:CALLABLE"):
        config_module.load(path, environ={})


@pytest.mark.parametrize("value, app", [
    ("myproject.wsgi", "myproject.wsgi:application"),  # gunicorn's MODULE, Django's form
    ("myproject.wsgi:application", "myproject.wsgi:application"),
    ("app:create_app()", "app:create_app()"),
])
def test_app_wsgi_takes_gunicorns_bare_module(value: str, app: str) -> None:
    loaded = config.load_mapping({"app": {"wsgi": value}}, source="x")
    assert loaded.app.wsgi == app


def test_app_wsgi_refuses_what_is_no_module() -> None:
    with pytest.raises(config.ConfigError, match=r"app\.wsgi"):
        config.load_mapping({"app": {"wsgi": "my-project/wsgi.py"}}, source="x")
