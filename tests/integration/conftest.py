"""Integration tests: each module gets its own freshly booted systemd container."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import App, configure
from tests.sandbox import Sandbox, build_deb


@pytest.hookimpl(hookwrapper=True)  # type: ignore[untyped-decorator]
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome: Any = yield
    if outcome.get_result().failed:
        module = getattr(item, "module", None)
        if module is not None:
            module.__dict__["_failed"] = True


@pytest.fixture(scope="session")
def deb() -> Path:
    """The package, built once per test run from this tree (scripts/build-deb, with lintian),
    also when pytest-xdist runs the modules in several workers."""
    if os.geteuid() != 0:
        pytest.fail("integration tests boot a container and need root (run scripts/test)")
    return build_deb(run=os.environ.get("PYTEST_XDIST_TESTRUNUID"))


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest, deb: Path) -> Iterator[Sandbox]:
    """A freshly booted container with the package installed by apt-get."""
    with Sandbox(deb=deb) as sandbox:
        yield sandbox
        if request.module.__dict__.get("_failed"):
            print("\n--- journal of the sandbox (bluegreen units) ---")
            print(sandbox.journal("-u", "bluegreen*", "-n", "300"))


@pytest.fixture(scope="module")
def config_extra() -> str:
    """TOML appended to the test module's bluegreen.toml (override in a module)."""
    return ""


@pytest.fixture(scope="module")
def app(box: Sandbox, config_extra: str) -> App:
    """The sample app in a local git repository, configured as bluegreen's repository."""
    application = App(box)
    application.create()
    configure(box, config_extra)
    return application
