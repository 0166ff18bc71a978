"""`ds-trainer shard`, `prepare` and `demo-data`: the commands that write shard sets, and their arguments."""

from __future__ import annotations

import argparse
from typing import Any


def add_data_parsers(sub: Any) -> None:
    """The data commands' parsers, on `sub` (the CLI's subparsers)."""
    p = sub.add_parser("shard", help="GenImage (or another dataset's) folder → WebDataset tar shards + manifest.json")
    p.add_argument(
        "--src",
        required=True,
        help="dataset root (GenImage: <generator>/{train,val}/{ai,nature}/*), or the list file for --layout list",
    )
    p.add_argument("--layout", default="genimage", metavar="LAYOUT",
                   help="how --src is laid out: genimage (default); binary-folders "
                        "([<split>/][<generator>/][<category>/]{0_real,1_fake}/*: UnivFD, ForenSynths, Chameleon, "
                        "AIGCDetectBenchmark; without train/val/test folders all goes to split val); list (a .csv "
                        "or .jsonl of path,label,generator[,split], paths relative to its folder)")  # fmt: skip
    p.add_argument("--out", required=True, help="output shard directory, e.g. data_shards/genimage")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    p.add_argument("--generators", nargs="+", default=None, help="only these generator folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-size",
        default=None,
        metavar="SIZE",
        help="also cap shard bytes, e.g. 1GB, 500MB, 2GiB (default: no byte limit)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that decode and write shards (default: all CPUs this process may use)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (batch logs)")
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="also read symbolic links that lead outside --src (default: skip them, listed in manifest.json)",
    )

    p = sub.add_parser(
        "prepare",
        help="a shard set derived from another, with the deterministic preprocessing "
        "done once (JPEG alignment, pre-resize, raw pixels)",
    )
    p.add_argument("src", metavar="SRC", help="a shard directory written by ds-trainer shard")
    p.add_argument("out", metavar="OUT", help="the new shard directory (same shards, keys and counts)")
    p.add_argument(
        "--align-jpeg",
        type=int,
        default=None,
        metavar="Q",
        help="store the fakes re-encoded as JPEG at quality Q, as data.align_jpeg_quality: Q does at "
        "load time (runs on the set then need data.align_jpeg_quality: Q)",
    )
    p.add_argument(
        "--resize-shortest",
        type=int,
        default=None,
        metavar="N",
        help="resize every image's shortest side to N, as crop: resize does (runs on the set then need "
        "data.crop: resize and data.image_size: N)",
    )
    p.add_argument(
        "--store",
        choices=["jpeg", "raw"],
        default="jpeg",
        help="jpeg (default): changed images as JPEG, others as they were; raw: every image as uint8 "
        "pixels (.npy, ~3 bytes a pixel, no decoding at load time)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=None,
        metavar="Q",
        help="quality of a resized image stored as JPEG (default: --align-jpeg's, else 96)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that prepare shards (default: all CPUs this process may use)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    p = sub.add_parser("demo-data", help="build the embedded demo set (no download) into data_shards/demo")
    p.add_argument("--out", default="data_shards/demo")
    p.add_argument("--train-per-class", type=int, default=400)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)


def cmd_shard(args: argparse.Namespace) -> int:
    """Re-running the same command resumes: complete shards are kept, only missing ones are written."""
    from ds_trainer.data.manifest import summary_line
    from ds_trainer.data.shards import shard_genimage

    report = shard_genimage(
        args.src, args.out, max_count=args.max_count, max_size=args.max_size, generators=args.generators,
        seed=args.seed, workers=args.workers, progress=args.progress, follow_symlinks=args.follow_symlinks,
        layout=args.layout,
    )  # fmt: skip
    kept = f", {report.reused} kept from an earlier run" if report.reused else ""
    print(f"wrote {report.written} shards to {args.out}{kept}: {summary_line(report.manifest)}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Re-running the same command resumes: prepared shards whose plan is unchanged are kept."""
    from ds_trainer.data.manifest import summary_line
    from ds_trainer.data.prepare import Preparation, prepare_shards
    from ds_trainer.data.prepared import describe

    prep = Preparation(args.align_jpeg, args.resize_shortest, args.store, args.jpeg_quality)
    report = prepare_shards(args.src, args.out, prep, workers=args.workers, progress=args.progress)
    kept = f", {report.reused} kept from an earlier run" if report.reused else ""
    print(f"prepared {report.written} shards in {args.out}{kept} ({describe(report.manifest['prepared'])}): "
          f"{summary_line(report.manifest)}")  # fmt: skip
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ds_trainer.data import make_demo_shards

    manifest = make_demo_shards(
        args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class, seed=args.seed
    )
    print(f"wrote demo shards to {args.out} ({_summary(manifest)})")
    return 0


def _summary(manifest: dict) -> str:
    total = sum(s["count"] for s in manifest["shards"])
    generators = sorted({s["generator"] for s in manifest["shards"]})
    return f"{total} images, generators: {', '.join(generators)}"
