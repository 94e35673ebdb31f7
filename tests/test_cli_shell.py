"""The installed ``splitmirror`` command: --version and shell completion generated from its parser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["splitmirror", *args], env={k: v for k, v in ENV.items() if k != "SPLITMIRROR_SERVER"},
                          capture_output=True, text=True, timeout=60)


def test_version_needs_no_server() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"splitmirror {version('splitmirror')}"


COMPLETE = """
eval "$(splitmirror completion {shell})"
c() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _splitmirror_complete; echo "${{COMPREPLY[*]}}"; }}
c splitmirror vol
c splitmirror volume cr
c splitmirror --server h:1 volume create db --track
c splitmirror --json pair di
c splitmirror pair create p --pvol a --m
c splitmirror completion ""
"""


def test_bash_completion_from_the_parser() -> None:
    result = subprocess.run(["bash", "-c", COMPLETE.format(shell="bash")], env=ENV, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["volume", "create", "--track-size", "display", "--mode",
                                          "--help -h bash zsh"]


BACKUP_WORDS = """
eval "$(splitmirror completion bash)"
c() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _splitmirror_complete; echo "${{COMPREPLY[*]}}"; }}
c splitmirror backup ""
c splitmirror backu
c splitmirror backup s
c splitmirror backup schedule ""
c splitmirror backup schedule set --gen
c splitmirror backup check --pro
c splitmirror backup verify ""
"""


def test_completion_offers_the_commands_as_typed_not_the_parsers_internal_names() -> None:
    """``backup schedule|check|verify`` are parsed as ``backup-ACTION``: completion, the
    command list of --help, usages and usage errors show them as users type them."""
    result = subprocess.run(["bash", "-c", BACKUP_WORDS.format()], env=ENV, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "--generation --group --help --wait -h check schedule verify", lines
    assert lines[1] == "backup backups", lines
    assert lines[2] == "schedule", lines
    assert lines[3] == "--help -h delete list set", lines
    assert lines[4] == "--generations", lines
    assert lines[5] == "--probe --probe-timeout", lines
    assert lines[6] == "--help -h", lines
    script = run("completion", "bash").stdout
    internal = re.compile(r"backup-(schedule|check|verify)")
    assert not internal.search(script), [line for line in script.splitlines() if internal.search(line)]
    helptext = run("--help").stdout
    assert "backup schedule" in helptext and not internal.search(helptext), helptext
    assert run("backup", "check", "--help").stdout.startswith("usage: splitmirror backup check ")
    wrong = run("no-such-command")
    assert wrong.returncode == 2 and "'backup schedule'" in wrong.stderr and not internal.search(wrong.stderr)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_loads() -> None:
    script = 'eval "$(splitmirror completion zsh)" && whence -w _splitmirror_complete'
    result = subprocess.run(["zsh", "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "function" in result.stdout, result.stderr


def test_zsh_script_is_the_bash_function_under_bashcompinit() -> None:
    zsh = run("completion", "zsh").stdout
    bash = run("completion", "bash").stdout
    compinit, bashcompinit, rest = zsh.split("\n", 2)
    assert compinit == "(( $+functions[compdef] )) || { autoload -U +X compinit && compinit -u }"
    assert bashcompinit == "autoload -U +X bashcompinit && bashcompinit"
    assert rest.replace("(zsh)", "(bash)").replace("completion zsh", "completion bash") == bash
