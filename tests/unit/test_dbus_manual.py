"""org.bluegreen1(5) documents the D-Bus API as the daemon exports it: every method, signal and
property with its signature, and every error, so that the manual cannot go stale unnoticed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from dbus_next.service import ServiceInterface

from bluegreen.api import dbus
from bluegreen.api.names import Error

MANUAL = (Path(__file__).resolve().parents[2] / "man/org.bluegreen1.5").read_text()


def exported(interface: type[ServiceInterface], kind: str) -> dict[str, Any]:
    """The members of ``kind`` (METHOD, SIGNAL, PROPERTY) the interface exports, by name."""
    members = {}
    for attribute in vars(interface).values():
        member = getattr(attribute, "__dict__", {}).get(f"__DBUS_{kind}")
        if member is True:  # a property is its own description
            member = attribute
        if member is not None:
            members[member.name] = member
    return members


def declaration(name: str) -> str:
    """The man page's declaration of ``name(...)`` in its interface listing."""
    found = re.search(rf"^\s+{name}\((.*?)\);$", MANUAL, re.MULTILINE | re.DOTALL)
    assert found, f"{name} is missing from org.bluegreen1(5)"
    return found.group(1)


def types(arguments: str, direction: str = "") -> list[str]:
    prefix = rf"\b{direction}\s+" if direction else r"(?:^|,)\s*"
    return re.findall(prefix + r"(\S+)\s+\w+", arguments)


@pytest.mark.parametrize("interface", [dbus.ManagerInterface, dbus.AppsInterface])
def test_every_method_is_documented_with_its_signature(interface: type[ServiceInterface]) -> None:
    methods = exported(interface, "METHOD")
    assert methods
    for name, method in methods.items():
        arguments = declaration(name)
        assert types(arguments, "in") == [arg.signature for arg in method.introspection.in_args], name
        assert types(arguments, "out") == [arg.signature for arg in method.introspection.out_args], name
        assert f".B {name}()" in MANUAL, f"{name} has no description in org.bluegreen1(5)"


def test_every_signal_is_documented_with_its_signature() -> None:
    signals = exported(dbus.ManagerInterface, "SIGNAL")
    assert signals
    for name, signal in signals.items():
        assert types(declaration(name)) == [arg.signature for arg in signal.introspection.args], name
        assert f".B {name}()" in MANUAL, f"{name} has no description in org.bluegreen1(5)"


def test_every_property_is_documented_with_its_signature() -> None:
    properties = exported(dbus.ManagerInterface, "PROPERTY")
    assert properties
    for name, prop in properties.items():
        assert f"readonly {prop.signature} {name} = " in MANUAL, f"{name} is missing"
        assert re.search(rf"^\.B {name}\b|\\fB{name}$", MANUAL, re.MULTILINE), (
            f"{name} has no description in org.bluegreen1(5)")


def test_every_error_is_documented() -> None:
    errors = MANUAL[MANUAL.index(".SH ERRORS"):MANUAL.index(".SH EXAMPLES")]
    for error in Error:
        name = error.dbus_name if error.dbus_name.startswith("org.bluegreen1.") else error.short_name
        assert re.search(rf"^\.BR? (\S+\.)?{re.escape(name)}( ,)?$", errors, re.MULTILINE), (
            f"{error.dbus_name} is missing from the ERRORS of org.bluegreen1(5)")


def test_the_statuses_of_each_error_are_those_the_clients_use() -> None:
    for error in Error:
        if error.dbus_name.startswith("org.bluegreen1."):
            entry = re.search(rf"^\.B {re.escape(error.dbus_name)}\n(.*?)(?=^\.(TP|PP))", MANUAL,
                              re.MULTILINE | re.DOTALL)
            assert entry, error.dbus_name
            assert f"({error.http_status}; {error.exit_status})" in entry.group(1), error.dbus_name
