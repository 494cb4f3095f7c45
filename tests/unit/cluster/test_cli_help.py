"""Every `pdserve` option explains itself in --help and shows its default."""

from __future__ import annotations

import argparse

import pytest

from cluster.cli import build_parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    parser = _subcommands()[command]
    help_text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False):
            shown = f"(default: {action.default})"
            assert shown in help_text or "default" in action.help, (command, action.dest)


def test_defaults_shown_where_they_were_missing() -> None:
    commands = _subcommands()
    bench = " ".join(commands["bench"].format_help().split())
    for expected in (
        "(default: completions)",
        "(default: random)",
        "(default: 0)",
        "sampling temperature (default: 0.0)",
    ):
        assert expected in bench
    status = " ".join(commands["status"].format_help().split())
    assert "(default: pdserve)" in status and "(default: 10.0)" in status
    generate = " ".join(commands["generate"].format_help().split())
    assert "(default: SmolLM2-135M-Instruct" in generate


def test_scale_adds_only_prefill_or_decode_instances(capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli import main

    assert main(["scale", "add", "mixed"]) == 2  # refused before any Ray cluster is asked
    assert "instances are added as prefill or decode, not mixed" in capsys.readouterr().err
