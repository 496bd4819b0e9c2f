"""`emotrain --help` and each verb's: written for a user, every option with its help and its default,
and renamed options still accepted."""

from __future__ import annotations

import argparse

import pytest

from emotrain.cli import HelpFormatter, build_parser

STUDY_ORDER = ["synth", "prepare", "train", "cv", "report", "evaluate", "predict", "push", "config"]


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def _shown_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def test_the_tool_help_describes_it_and_lists_the_verbs_in_the_order_of_a_study():
    parser = build_parser()
    assert list(_verbs(parser)) == STUDY_ORDER
    text = parser.format_help()
    assert "emotion recognition" in text and "call one function per verb" not in text  # for a user, not internals
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("    ") and line[4] != " "]
    assert listed == STUDY_ORDER, text
    assert "emotrain VERB --help" in text


@pytest.mark.parametrize("verb", STUDY_ORDER)
def test_every_option_of_every_verb_has_help_and_shows_its_default(verb):
    parser = _verbs(build_parser())[verb]
    formatter = HelpFormatter(prog="emotrain")
    for action in _shown_actions(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 8, f"emotrain {verb} {name}: no help"
        if action.option_strings and action.nargs != 0:  # (a flag is off unless given)
            assert "default" in formatter._get_help_string(action), f"emotrain {verb} {name}: no default shown"
    assert parser.description and parser.description != parser.format_usage()


def test_a_default_is_written_out_in_the_help():
    predict = _verbs(build_parser())["predict"].format_help()
    assert "(default: 8)" in " ".join(predict.split())  # --batch-size
    prepare = " ".join(_verbs(build_parser())["prepare"].format_help().split())
    assert "(default: flac)" in prepare and "shards per group (default: 8)" in prepare


def test_train_help_points_to_every_key_and_shows_overrides_as_optional():
    text = _verbs(build_parser())["train"].format_help()
    assert "emotrain config --keys" in text
    assert "usage: emotrain train [-h] CONFIG [KEY=VALUE ...]" in text
    assert "optional dotted overrides" in text


def test_predict_batch_is_now_manifest_and_the_old_name_still_works(capsys):
    parser = build_parser()
    help_text = _verbs(parser)["predict"].format_help()
    assert "--manifest FILE" in help_text and "--batch " not in help_text and "--batch-size N" in help_text
    assert parser.parse_args(["predict", "best", "--manifest", "clips.csv"]).manifest == "clips.csv"
    assert capsys.readouterr().err == ""
    args = parser.parse_args(["predict", "best", "--batch", "clips.csv", "--batch-size", "4"])
    assert (args.manifest, args.batch_size) == ("clips.csv", 4)
    note = capsys.readouterr().err.strip().splitlines()
    assert note == ["emotrain predict: note: --batch is now called --manifest (--batch still works, for now)"]


def test_predict_without_audio_or_manifest_says_which_to_give():
    from emotrain.cli import main

    with pytest.raises(SystemExit, match="give --audio FILE or --manifest FILE"):
        main(["predict", "best"])
