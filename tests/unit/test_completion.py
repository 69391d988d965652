"""The bash completion offers what bluegreenctl takes: every verb, and each verb's options."""

from __future__ import annotations

import argparse
import shlex
import subprocess
from pathlib import Path

import pytest

from bluegreen import cli

SCRIPT = Path(__file__).resolve().parents[2] / "data" / "completions" / "bluegreenctl"

# bash-completion's _init_completion, reduced to what the script reads from it.
INIT = """
_init_completion() {
    words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD
    cur=${words[cword]}; prev=${words[cword - 1]}
}
"""


def complete(line: str) -> set[str]:
    """What bash offers for the last word of ``line`` (an empty last word when it ends in a
    space). None of the completions tested here asks bluegreenctl (ids, apps)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    script = (f"{INIT}\nsource {shlex.quote(str(SCRIPT))}\n"
              f"COMP_WORDS=({' '.join(shlex.quote(word) for word in words)})\n"
              f"COMP_CWORD={len(words) - 1}\n_bluegreenctl\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    return {word for word in out.split("\n") if word}


def options(verb: str) -> set[str]:
    subparsers = next(action for action in cli.parser()._actions
                      if isinstance(action, argparse._SubParsersAction))
    return {option for action in subparsers.choices[verb]._actions
            for option in action.option_strings}


def test_every_verb_is_offered() -> None:
    assert complete("bluegreenctl ") == {verb.NAME for verb in cli.VERBS} | {
        "-a", "--app", "-h", "--help"}


@pytest.mark.parametrize("verb", [verb.NAME for verb in cli.VERBS])
def test_each_verbs_options_are_offered(verb: str) -> None:
    assert complete(f"bluegreenctl {verb} -") == options(verb)


def test_a_canary_share_is_offered_after_canary() -> None:
    assert complete("bluegreenctl deploy --canary ") == {"10%", "25%", "50%"}
    assert complete("bluegreenctl -a staging deploy v2 --canary 2") == {"25%"}
