"""`emotrain <verb>`: parse arguments, load the config, call one function per verb — nothing else."""

from __future__ import annotations

import argparse
import sys

from emotrain.config import ConfigError, describe_fields, load_config


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (configs/...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5 data.fold=3")


def cmd_config(args: argparse.Namespace) -> int:
    if args.keys:
        for key, type_name, default, doc in describe_fields():
            print(f"{key}  ({type_name}, default {default!r})\n    {doc}")
        return 0
    if args.config is None:
        raise SystemExit("emotrain config: give a YAML file, or --keys to list every key")
    cfg = load_config(args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from emotrain.data.synth import synthesize_release

    summary = synthesize_release(
        args.out_dir,
        seed=args.seed,
        utterances_per_session=args.utterances_per_session,
        duration_scale=args.duration_scale,
        overwrite=True,  # seeded: rewriting gives the same files, so rerunning the README is idempotent
    )
    print(
        f"synthetic IEMOCAP-layout release: {summary['four_class_utterances']} 4-class utterances "
        f"({summary['four_class_seconds'] / 60:.1f} min) + {summary['utterances'] - summary['four_class_utterances']} "
        f"outside the 4 classes, {summary['dialogs']} dialogs, seed {summary['seed']} → {args.out_dir}"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from emotrain.data.prepare import NothingToPrepareError, prepare, summarize

    try:
        report = prepare(
            args.iemocap_root,
            args.out_dir,
            num_shards=args.num_shards,
            audio_format=args.audio_format,
            workers=args.workers,
        )
    except (NothingToPrepareError, FileNotFoundError) as err:
        print(f"emotrain prepare: error: {err}", file=sys.stderr)
        return 2
    print(summarize(report))
    print(f"report: {args.out_dir}/prepare_report.json")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from emotrain.data.folds import check_prepared

    cfg = load_config(args.config, args.overrides)
    # Training before `emotrain prepare` is the first mistake a new user makes: fail in one line,
    # before importing torch, creating output_dir or building a model.
    check_prepared(cfg.data.path)

    from emotrain.train.checkpoint import ResumeError
    from emotrain.train.recipe import TooManyNonFiniteSteps, train
    from emotrain.train.step import NonFiniteStepApplied

    try:
        return train(cfg)
    except (TooManyNonFiniteSteps, NonFiniteStepApplied, ResumeError) as err:
        print(f"emotrain train: error: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotrain", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("config", help="print the resolved config (or --keys: every key with its doc)")
    p.add_argument("config", nargs="?", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--keys", action="store_true", help="list every config key, its type, default and doc")
    p.set_defaults(func=cmd_config)

    p = verbs.add_parser("synth", help="write a learnable synthetic corpus in the IEMOCAP release layout")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--utterances-per-session", type=int, default=120)
    p.add_argument("--duration-scale", type=float, default=0.5, help="multiplies IEMOCAP-shaped durations")
    p.set_defaults(func=cmd_synth)

    p = verbs.add_parser("prepare", help="IEMOCAP_full_release → Parquet shards per session")
    p.add_argument("iemocap_root", help="the IEMOCAP_full_release folder (holding Session1..5)")
    p.add_argument("out_dir")
    p.add_argument("--num-shards", type=int, default=8, help="shards per session (default 8)")
    p.add_argument("--audio-format", choices=["flac", "wav"], default="flac")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("train", help="train (directly or under accelerate launch)")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        # One line, no traceback: the message names the key (or file) and what to do.
        message = " ".join(str(err).splitlines())
        print(f"emotrain: config error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
