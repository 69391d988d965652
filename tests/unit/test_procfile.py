from __future__ import annotations

from pathlib import Path

import pytest

from bluegreen import procfile
from bluegreen.procfile import ProcfileError


def test_parse_skips_comments_and_blank_lines() -> None:
    text = "# processes\nweb: gunicorn app:app\n\nworker:  rq worker tasks  \nrelease: flask db upgrade\n"
    assert procfile.parse(text) == {"web": "gunicorn app:app", "worker": "rq worker tasks",
                                    "release": "flask db upgrade"}


@pytest.mark.parametrize("text, problem", [
    ("worker rq worker\n", "expected 'name: command'"),
    ("worker:\n", "expected 'name: command'"),
    ("worker: a\nworker: b\n", "appears twice"),
    ("-worker: a\n", "not a process name"),
])
def test_parse_names_the_line(text: str, problem: str) -> None:
    with pytest.raises(ProcfileError, match=problem) as error:
        procfile.parse(text)
    assert "Procfile:" in str(error.value)


def test_processes_merge_the_configuration(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("web: gunicorn app:app\nrelease: alembic upgrade head\n"
                                       "worker: python worker.py\nclock: python clock.py\n")
    found = procfile.processes(tmp_path, "", {"clock": "", "mailer": "python mail.py"})
    assert found.release == "alembic upgrade head"
    assert dict(found.workers) == {"mailer": "python mail.py", "worker": "python worker.py"}
    assert procfile.processes(tmp_path, "flask db upgrade", {}).release == "flask db upgrade"


def test_no_procfile_means_no_release_phase_and_no_workers(tmp_path: Path) -> None:
    found = procfile.processes(tmp_path, "", {})
    assert found.release == ""
    assert dict(found.workers) == {}
