"""The command line documents itself: `--version`, a help text on every option of every
subcommand (so a new option without one fails here), and the man page generated from the parser
(scripts/manpage.sh, argparse-manpage) rendering with the real `man` and naming every command."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, run_blockrep

from engine.cli import build_parser


def _parsers(p: argparse.ArgumentParser, path: str = "blockrep"):
    """(command path, parser) for the top-level parser and every subcommand, depth first."""
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _parsers(sp, f"{path} {name}")


def _commands() -> list[str]:
    return [path for path, _ in _parsers(build_parser())][1:]


def test_version_prints_the_package_version():
    r = run_blockrep("--version", check=True)
    want = importlib.metadata.version("blockrep")
    assert r.stdout == f"blockrep {want}\n" and r.stderr == ""
    with open(REPO / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["version"] == want  # the installed package is this checkout


def test_every_option_of_every_subcommand_has_a_help_text():
    missing = []
    for path, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                missing += [f"{path} {c.dest}" for c in a._choices_actions if not (c.help or "").strip()]
                continue
            if not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, f"options without help=: {missing}"
    assert len(_commands()) >= 15  # the walk reached the nested subcommands (snapshot create …)


def _option_help(command: list[str], option: str) -> str:
    """The help text `blockrep COMMAND --help` prints for option, on one line."""
    out = run_blockrep(*command, "--help", check=True).stdout
    m = re.search(rf"^  {re.escape(option)}\b(.*?)(?=^  -|\Z)", out, re.M | re.S)
    assert m, f"{option} is not in {command} --help"
    return " ".join(m.group(1).split())


@pytest.mark.parametrize("option, words", [
    ("--rate", ["bytes per second", "powers of 1024", "10M"]),
    ("--connections", ["default"]),
])
def test_replicate_help_says_units(option, words):
    block = _option_help(["replicate"], option)
    for w in words:
        assert w in block, (option, w, block)


@pytest.mark.parametrize("command, option, unit", [
    (["create"], "--size", "powers of 1024"),
    (["create"], "--segment-size", "powers of 1024"),
    (["serve"], "--keep-min-age", "a bare number is seconds"),
    (["status"], "--max-rpo", "exit 2"),
])
def test_size_and_duration_options_say_their_units(command, option, unit):
    assert unit in _option_help(command, option)


def _render(page: Path) -> str:
    env = {**os.environ, "MANWIDTH": "100", "LC_ALL": "C.UTF-8"}
    if shutil.which("man"):
        r = subprocess.run(["man", "--nh", "--nj", "-l", str(page)], capture_output=True, text=True, env=env,
                           timeout=60)
    elif shutil.which("groff"):
        r = subprocess.run(["groff", "-man", "-Tutf8", "-rHY=0", str(page)], capture_output=True, text=True, env=env,
                           timeout=60)
    else:
        pytest.skip("neither man nor groff is installed (scripts/bootstrap.sh installs groff-base)")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    # man pipes through col -b only to a terminal; drop overstrike (bold/underline) either way
    return re.sub(r".\x08", "", r.stdout)


def test_man_page_generated_from_the_parser_renders_and_names_every_command(tmp_path):
    page = tmp_path / "man1" / "blockrep.1"
    r = subprocess.run([str(REPO / "scripts" / "manpage.sh"), str(page)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    text = _render(page)
    flat = " ".join(text.split())
    assert flat.startswith("BLOCKREP(1)")
    version = importlib.metadata.version("blockrep")
    assert f"blockrep {version}" in flat  # the footer
    for path in _commands():
        assert f"COMMAND '{path}'" in flat, f"{path} has no section in the man page"
    assert "blockrep replicate" in flat and "bytes per second" in flat
    if "schedule" in run_blockrep("--help").stdout:
        assert "blockrep schedule" in flat
    assert "EXIT STATUS" in flat and "--max-rpo" in flat


def test_bootstrap_installed_the_man_page_where_man_finds_it():
    """scripts/bootstrap.sh writes .venv/share/man/man1/blockrep.1; man-db maps PATH entries
    (.venv/bin) to their ../share/man, so `man blockrep` finds it with the venv on PATH."""
    page = REPO / ".venv" / "share" / "man" / "man1" / "blockrep.1"
    assert page.is_file(), "run scripts/bootstrap.sh (or make man)"
    if not shutil.which("man"):
        pytest.skip("man is not installed")
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"}
    env.pop("MANPATH", None)
    r = subprocess.run(["man", "-w", "blockrep"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and Path(r.stdout.strip()).resolve() == page.resolve(), (r.stdout, r.stderr)
