"""`ds-trainer` subcommands. `main(argv) -> int` so tests can call it in-process."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from ds_trainer.child_processes import Terminated
from ds_trainer.cli_data import add_data_parsers, cmd_demo_data, cmd_prepare, cmd_shard
from ds_trainer.cli_eval import add_eval_parser, cmd_eval
from ds_trainer.errors import DsTrainerError, PeerLostError, Preempted, first_line
from ds_trainer.launcher import LAUNCHED_ENV
from ds_trainer.sinks.logs import for_console, route_deepspeed_logs

log = logging.getLogger(__name__)


def _add_config_args(
    p: argparse.ArgumentParser, required: bool = True, what: str = "YAML run config (see ds_configs/)"
) -> None:
    p.add_argument("--config", required=required, help=what)
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.learning_rate=3e-5 (repeatable)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds-trainer", description="DeepSpeed trainer for AI-generated image detectors"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config (one process per rank; see launch.sh)")
    _add_config_args(p)
    p.add_argument("--load-dir", help="resume from the newest complete checkpoint in this directory")
    # The deepspeed launcher appends --local_rank=N to the script's arguments.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    add_eval_parser(sub, _add_config_args)

    p = sub.add_parser("report", help="plots and a self-contained HTML page from one or more `eval` results")
    p.add_argument(
        "--eval",
        dest="evals",
        action="append",
        required=True,
        metavar="RESULTS.json",
        help="a JSON written by ds-trainer eval (repeat to compare runs in the same figures)",
    )
    p.add_argument(
        "--run",
        dest="runs",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="the run_dir of each --eval, in the same order, for training curves (optional)",
    )
    p.add_argument(
        "--name",
        dest="names",
        action="append",
        default=[],
        metavar="NAME",
        help="legend name of each --eval, in the same order (default: <checkpoint dir>/<tag>)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (PNGs and report.html)")
    p.add_argument(
        "--threshold", type=float, default=0.5, help="P(AI) threshold for histograms and the confusion matrix"
    )
    p.add_argument(
        "--tensorboard",
        default=None,
        metavar="LOG_DIR",
        help="also write PR curves per generator and the figures to this TensorBoard log dir",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="NAME",
        help="put the runs beside a paper's published numbers (table with the difference, side-by-side bars); "
        "NAME is an entry of --published, e.g. effort, univfd_drct",
    )
    p.add_argument(
        "--published",
        default=None,
        metavar="FILE",
        help="published-results JSON for --reference (default: ds_configs/recipes/published.json)",
    )

    p = sub.add_parser("ds-config", help="print the DeepSpeed JSON a config resolves to")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="micro-batches per rank per epoch (default: from the shard manifest)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="device to resolve precision for (default: this machine's)",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether that device has fast bf16 (default: detect)",
    )

    add_data_parsers(sub)

    p = sub.add_parser("export", help="DeepSpeed checkpoint → Hugging Face directory (fp32, loads without DeepSpeed)")
    p.add_argument("--load-dir", required=True, help="checkpoint directory (newest complete tag), or a tag directory")
    p.add_argument("--tag", default=None, help="export this tag of --load-dir, e.g. best or epoch_3")
    p.add_argument("--out", required=True, help="new or empty output directory")
    p.add_argument("--force", action="store_true", help="replace --out when it holds a previous export")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip reloading the export and comparing its logits with the checkpoint's",
    )

    p = sub.add_parser("predict", help="P(ai-generated) for image files, from an exported model")
    p.add_argument("--model", required=True, help="a directory written by ds-trainer export")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true",
                   help="print a JSON list instead of path<TAB>p_ai<TAB>ai|real lines (the decision at the "
                        "export's threshold: the run's data.threshold)")  # fmt: skip
    return parser


@contextlib.contextmanager
def _data_stdout() -> Iterator[TextIO]:
    """For a command whose product is data: yields stdout, and sends anything else printed meanwhile to stderr.

    Libraries print (DeepSpeed's accelerator notice, op builds); in `ds-config > ds.json` or
    `predict --json | jq` one such line makes the output invalid.
    """
    data = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield data


def _cmd_train(args: argparse.Namespace) -> int:
    from ds_trainer.config import load_config
    from ds_trainer.run import run_training

    cfg = load_config(args.config, args.overrides)
    rows = run_training(cfg, load_dir=args.load_dir, debug=args.debug)
    if rows:
        log.debug("final metrics: %s", rows[-1])
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ds_trainer import report
    from ds_trainer.errors import ConfigError

    for flag, given in (("--run", args.runs), ("--name", args.names)):
        if given and len(given) != len(args.evals):
            raise ConfigError(
                f"report: {len(given)} {flag} for {len(args.evals)} --eval; give one per --eval, in order"
            )
    reference = None
    if args.reference is not None:
        from ds_trainer.published import reference as find_reference

        reference = find_reference(args.reference, args.published)  # before any eval file is read
    elif args.published is not None:
        raise ConfigError("report: --published gives the file --reference NAME reads; add --reference")
    runs = [report.load_eval(path, args.names[i] if args.names else None) for i, path in enumerate(args.evals)]
    for run, run_dir in zip(runs, args.runs):
        report.attach_run(run, run_dir)
    written = report.write_report(
        runs, args.out, threshold=args.threshold, tensorboard=args.tensorboard, reference=reference
    )
    print(written.html)
    return 0


def _cmd_ds_config(args: argparse.Namespace) -> int:
    with _data_stdout() as out:
        ds = _resolve_ds_config(args)
        out.write(json.dumps(ds, indent=2) + "\n")
    return 0


def _resolve_ds_config(args: argparse.Namespace) -> dict:
    from ds_trainer.config import load_config
    from ds_trainer.ds_config import DeviceInfo, build_ds_config

    cfg = load_config(args.config, args.overrides)
    steps = args.steps_per_epoch
    if steps is None:
        from ds_trainer.data import make_shard_loader

        # The loader owns the steps-per-epoch rule; building it reads only the manifest.
        steps = len(make_shard_loader(
            cfg.data.shards, cfg.data.train_split, batch_size=cfg.training.batch_size, train=True,
            world_size=args.world_size, generators=cfg.data.train_generators,
        ))  # fmt: skip
    if args.device is None:
        from ds_trainer.distributed import detect_device

        device = detect_device()
    else:
        device = DeviceInfo(type=args.device, bf16_supported=args.device == "cuda")
    if args.bf16 is not None:
        device = DeviceInfo(type=device.type, bf16_supported=args.bf16)
    return build_ds_config(cfg, args.world_size, steps, device)


def _cmd_export(args: argparse.Namespace) -> int:
    import os

    from ds_trainer.export import export_checkpoint

    # Consolidation reads files on the CPU; without this DeepSpeed probes for a GPU and logs to stdout.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # export_checkpoint logs the one line that says what was exported where.
    export_checkpoint(args.load_dir, args.out, tag=args.tag, force=args.force, verify=args.verify)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    """One line per image, in argument order; unreadable files are skipped, named on stderr, and exit 3."""
    from ds_trainer.errors import ConfigError, DataError
    from ds_trainer.export import load_exported, predict_paths

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    with _data_stdout() as out:
        results = predict_paths(load_exported(args.model), args.images, batch_size=args.batch_size)
        if args.json:
            rows = [{"path": r.path, "p_ai": r.p_ai, "ai": r.ai, "p_ai_calibrated": r.p_ai_calibrated,
                     "error": r.error} for r in results]  # fmt: skip
            out.write(json.dumps(rows, indent=2) + "\n")
        else:  # path, P(AI), and the decision at the export's threshold
            out.writelines(f"{r.path}\t{r.p_ai:.6f}\t{'ai' if r.ai else 'real'}\n" for r in results if r.error is None)
    failed = [r for r in results if r.error is not None]
    if failed:
        listing = "\n".join(f"  {r.error}" for r in failed)
        raise DataError(f"{len(failed)} of {len(results)} images unreadable:\n{listing}")
    return 0


_COMMANDS = {"train": _cmd_train, "ds-config": _cmd_ds_config, "shard": cmd_shard, "demo-data": cmd_demo_data}
_COMMANDS["prepare"] = cmd_prepare
_COMMANDS.update({"export": _cmd_export, "predict": _cmd_predict, "eval": cmd_eval, "report": _cmd_report})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
        for handler in logging.getLogger().handlers:  # stderr: a console, for every command
            handler.addFilter(for_console)
    # Before any command imports DeepSpeed, whose accelerator warning is logged at import.
    route_deepspeed_logs(debug=args.debug)
    if os.environ.get(LAUNCHED_ENV) == "1" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt_once)
    try:
        code = _COMMANDS[args.command](args)
        _end_cleanly()
        return code
    except Preempted as exc:
        # Information, not an error: rank 0 already said what it saved and how to resume; 75 asks for a requeue.
        _end_cleanly()
        return exc.exit_code
    except DsTrainerError as exc:
        if args.debug:
            raise
        print(f"ds-trainer {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # Under launch.sh the launcher says it once for the job; each rank saying it too would be noise.
        if os.environ.get(LAUNCHED_ENV) != "1":
            print(f"ds-trainer {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:  # SIGTERM while a command's own workers ran: they were stopped
        print(f"ds-trainer {args.command}: {exc}, stopped", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:
        if args.debug or not _is_peer_failure(exc):
            raise
        lost = PeerLostError(
            f"lost contact with another rank ({first_line(exc)}): a rank died or the network failed. Its log says "
            "why; resume with --load-dir <checkpoint_dir> (the last complete checkpoint)"
        )
        print(f"ds-trainer {args.command}: error: {lost}", file=sys.stderr)
        return lost.exit_code


def _end_cleanly() -> None:
    """The command ended with every rank in step: its process group (if it started one) goes at exit."""
    dist_module = sys.modules.get("ds_trainer.distributed")  # not imported: no process group to destroy
    if dist_module is not None:
        dist_module.end_cleanly()


def interrupt_once(signum: int, frame: object) -> None:
    """A launched rank's Ctrl-C: the first one stops it; the next (the launcher forwards one to ranks still
    running after 5 s) must not interrupt the clean-up, where Python prints it as an ignored traceback.

    The launcher also answers Ctrl-C by SIGTERMing every process under each rank, its loader workers
    included. Those deaths are expected from here on, so torch's SIGCHLD handler, which raises
    "DataLoader worker ... is killed by signal: Terminated" wherever the rank is (in CI: inside the
    loader's `__del__`, printed as an ignored traceback), is set aside too.

    Both are set aside with a Python handler that does nothing, not SIG_IGN or SIG_DFL: a signal that
    arrived beside this one (a worker's SIGCHLD in the same instant, which CI saw) was already noted for
    its old Python handler, and Python, finding no Python handler when it gets to it, prints
    "Signal 17 ignored due to race condition" as an ignored traceback.
    """
    signal.signal(signal.SIGINT, _ignore_signal)
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, _ignore_signal)
    raise KeyboardInterrupt


def _ignore_signal(signum: int, frame: object) -> None:
    """A handler that does nothing (see `interrupt_once`)."""


# What gloo and NCCL raise when a peer is gone or a collective outlived distributed.timeout_s.
_PEER_FAILURE = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL",
)


def _is_peer_failure(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(exc)
    return dist.is_initialized() and dist.get_world_size() > 1 and any(m in text for m in _PEER_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
