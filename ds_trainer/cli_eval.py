"""`ds-trainer eval`: its arguments and the command (the benchmark protocol and its tables on a checkpoint)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def _add_track_args(p: argparse.ArgumentParser) -> None:
    """eval's tables beside the clean one (ds_trainer/eval_tracks.py); checked before anything loads."""
    # fmt: off
    p.add_argument("--perturb", action="append", default=[], metavar="KIND:LEVELS",
                   help="also score the val set degraded, both classes alike, a table per level (repeatable): "
                        "jpeg:95,75,50,30 (quality), blur:1,3,5 (sigma px), resize:112,64 (shortest side px), "
                        "downscale:0.5,0.25 (factor), or genimage-degraded (resize 112,64, jpeg 65,30, blur 3,5)")
    p.add_argument("--align-jpeg", default=None, metavar="Q",
                   help="debiased track: also score with the images re-encoded as JPEG at quality Q (e.g. 96)")
    p.add_argument("--align-classes", default=None, choices=["both", "fakes"],
                   help="which classes --align-jpeg re-encodes (default both; fakes: the AI-generated only)")
    p.add_argument("--size-matched", action="store_true",
                   help="debiased track: also score only the reals whose width and height lie within their "
                        "generator's fakes' min..max width and height (and all the fakes)")
    # fmt: on


def add_eval_parser(sub: Any, add_config_args: Callable[..., None]) -> None:
    """The `eval` subcommand's parser, on `sub` (the CLI's subparsers)."""
    p = sub.add_parser(
        "eval", help="the benchmark protocol on a checkpoint: per-generator acc, real/fake acc, AP, AUC and the mean"
    )
    add_config_args(
        p, required=False,
        what="YAML run config for what to score: data.shards, data.val_split, data.eval_generators, and run_dir "
             "for the default --out (default: the config saved in the checkpoint). The model always comes from "
             "the checkpoint",
    )  # fmt: skip
    p.add_argument("--load-dir", required=True, help="checkpoint directory or tag directory")
    p.add_argument("--tag", default=None,
                   help="tag inside --load-dir, e.g. best or epoch_3 (default: the tag the directory's `latest` file "
                        "names, i.e. the last save; if that one is incomplete, the newest complete tag)")  # fmt: skip
    p.add_argument("--out", default=None, help="JSON output (default: <run_dir>/eval_<tag>.json)")
    p.add_argument("--report", default=None, metavar="DIR", help="also write the report (PNGs + report.html) here")
    p.add_argument("--shards", dest="datasets", action="append", default=[], metavar="[NAME=]PATH[:SPLIT]",
                   help="score this shard set instead of data.shards, all its generators, on SPLIT (default "
                        "data.val_split); repeat for a cross-dataset table (a row per set and generator, each set's "
                        "mean, the mean over sets); NAME defaults to the directory's name")  # fmt: skip
    p.add_argument("--eval-crops", default=None, metavar="K",
                   help="with data.crop native: score each image by the mean logits of K crops at its native "
                        "resolution: 1 centre, 5 corners + centre, 10 those mirrored too (= --set data.eval_crops=K)")  # fmt: skip
    _add_track_args(p)
    p.add_argument("--threshold", dest="thresholds", action="append", default=[], metavar="MODE",
                   help="also print the protocol table at another P(AI) cut (repeatable, comma-separated): "
                        "calibrated (fitted on the holdout of the training generators, stored with the checkpoint), "
                        "oracle (per generator, tuned on the test labels: a labelled upper bound) or a number in "
                        "(0, 1); the main table stays at 0.5, GenImage's protocol")  # fmt: skip
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples for the 95%% percentile bootstrap intervals of every metric and mean, "
                        "each class resampled within each generator (default: 1000; 0: no intervals)")  # fmt: skip
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED", help="seed of those resamples (default: 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def cmd_eval(args: argparse.Namespace) -> int:
    from ds_trainer.bootstrap import MAX_RESAMPLES
    from ds_trainer.config import build_config, load_config
    from ds_trainer.eval_thresholds import parse_modes
    from ds_trainer.eval_tracks import tracks_from_args
    from ds_trainer.run import run_evaluation

    tracks = tracks_from_args(args.perturb, args.align_jpeg, args.align_classes, args.size_matched)
    thresholds = parse_modes(args.thresholds)
    # last, so the flag wins over a --set of the same key; validated with the rest of the config
    overrides = [*args.overrides, *([f"data.eval_crops={args.eval_crops}"] if args.eval_crops is not None else [])]
    from ds_trainer.errors import ConfigError

    if not 0 <= args.bootstrap <= MAX_RESAMPLES:
        raise ConfigError(
            f"--bootstrap {args.bootstrap}: give a number of resamples from 0 (no intervals) to {MAX_RESAMPLES:,} "
            "(1000 is plenty for 95 % intervals)"
        )
    if args.bootstrap_seed < 0:
        raise ConfigError(f"--bootstrap-seed {args.bootstrap_seed}: a seed is a whole number from 0")
    if args.config is not None:
        cfg = load_config(args.config, overrides)
    else:
        from ds_trainer.consolidate import resolve_source

        # The run's own data and run_dir: `eval --load-dir X` scores what that run validated on.
        source = resolve_source(args.load_dir, args.tag)
        cfg = build_config(source.config, overrides, source=f"the config saved in {source.tag_dir}")
    datasets = None
    if args.datasets:
        from ds_trainer.eval_datasets import parse_datasets

        datasets = parse_datasets(args.datasets, cfg.data.val_split)
    run_evaluation(
        cfg,
        args.load_dir,
        tag=args.tag,
        out=args.out,
        debug=args.debug,
        report_dir=args.report,
        tracks=tracks,
        datasets=datasets,
        bootstrap=args.bootstrap,
        bootstrap_seed=args.bootstrap_seed,
        thresholds=thresholds,
    )
    return 0
