"""The help texts agree with each other and with the README (metavars, hardware lists, durations)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from repux.cli import SUBCOMMANDS, build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_every_subcommand_is_listed():
    assert set(_subparsers()) == set(SUBCOMMANDS)


def test_shared_options_have_one_help_text_and_metavar():
    for flag in ("--device", "--progress"):
        found = {name: _option(parser, flag) for name, parser in _subparsers().items()}
        # repux serve's --device is repeatable (one worker per device): another option of the same name.
        found = {name: action for name, action in found.items() if action is not None and not isinstance(action, argparse._AppendAction)}
        assert len(found) >= 3, flag
        assert len({action.help for action in found.values()}) == 1, {n: a.help for n, a in found.items()}
        assert len({action.metavar for action in found.values()}) == 1, {n: a.metavar for n, a in found.items()}


def test_device_options_in_the_readme_match_the_help():
    rows = re.findall(r"^\| `--device ([^`]*)` \| (.*) \|$", README, flags=re.MULTILINE)
    assert rows
    device = _option(_subparsers()["segment"], "--device")
    for metavar, meaning in rows:
        assert metavar == device.metavar
        assert all(word in meaning for word in ("`auto`", "`cpu`", "`cuda`", "`cuda:N`", "CUDA when present"))


def test_fast_names_the_same_hardware_everywhere():
    fast = _option(_subparsers()["segment"], "--fast").help
    hardware = "CUDA GPUs, CPUs with AMX or AVX-512 BF16"
    assert hardware in fast
    mentions = [line for line in README.splitlines() if "`--fast`" in line and "bfloat16" in line]
    assert mentions and all(hardware in line for line in mentions), mentions


def test_quick_bench_duration_agrees_with_the_readme():
    quick = _option(_subparsers()["bench"], "--quick").help
    minutes = re.search(r"about (\d+) minutes on 2 cores", quick)
    assert minutes, quick
    assert f"`repux bench --quick` runs a reduced version\nin about {minutes.group(1)} minutes on 2 cores" in README
