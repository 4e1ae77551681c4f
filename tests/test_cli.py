"""The command line's help: a description per command, help and defaults on every argument, the workflow
epilog, and the README's command list in step with the parser."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from cirrus_batch.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def readme_commands() -> dict[str, str]:
    """``{name: line}`` of the code block under "## Commands" in the README."""
    text = README.read_text()
    block = text.split("## Commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return {line.split()[1]: line for line in block.splitlines() if line.startswith("cirrus ")}


def test_every_command_and_argument_is_described_with_its_default():
    main = build_parser().format_help()
    assert "workflow:" in main and all(f"cirrus {step} " in main for step in
                                       ("synth", "ingest", "prepare", "train", "reprocess", "report"))  # fmt: skip
    for name, parser in commands().items():
        assert parser.description, name
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), f"{name} {action.option_strings}"
    assert "(default: 5)" in commands()["synth"].format_help()


@pytest.mark.parametrize("name", sorted(commands()))
def test_the_readme_lists_every_option_of_every_command(name):
    lines = readme_commands()
    assert set(lines) == set(commands())
    parser = commands()[name]
    wanted = {a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}
    listed = set(re.findall(r"\[(--[a-z-]+)", lines[name])) | set(re.findall(r" (--[a-z-]+) ", lines[name]))
    assert listed == wanted, f"README: cirrus {name} lists {sorted(listed - wanted)} too many, lacks {sorted(wanted - listed)}"
    positionals = [a.metavar or a.dest.upper() for a in parser._actions if not a.option_strings]
    assert [w.split("|")[0].split(".")[0] for w in lines[name].split()[2 : 2 + len(positionals)]] == positionals
