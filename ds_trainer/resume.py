"""The checkpoint's metadata (`<tag>/ds_trainer.json`): its one writer, its one reader, and the resume plan.

`metadata()` builds what rank 0 writes next to DeepSpeed's files (checkpoint.save adds the file
sizes and digests, and seals it: integrity.py); `read()` is the only place that interprets it, for
resume, `export` and `eval` alike, after checking its seal. The layout is versioned: version 1
(ds_trainer up to the component split) held the interrupted epoch's totals as a positional list and,
before merged parameter groups, no `param_groups`; version 2 had no digests (version 3 records a
sha256 per file and of the marker). `read()` upgrades both, so such checkpoints still resume and
export (unverified, after one warning: integrity.verify).

`plan()` decides, before any engine exists, how a checkpoint saved on another world size resumes:
the global batch stays what it was (the LR schedule and the optimizer's statistics depend on it), so
gradient accumulation absorbs the change of rank count, and ZeRO-sharded or bf16 optimizer state
goes through DeepSpeed's universal format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ds_trainer import checkpoint, integrity
from ds_trainer.errors import CheckpointError, ConfigError, first_line

log = logging.getLogger(__name__)

VERSION = integrity.LAYOUT
_REQUIRED = ("epoch", "global_step")


def num_parameters(model: nn.Module) -> int:
    # ZeRO-3 leaves each parameter's full size in ds_numel once the engine has partitioned it.
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def model_name(model: nn.Module) -> str:
    return str(getattr(model, "model_name", type(model).__name__))


def metadata(train_state: dict[str, Any], engine: Any, *, world_size: int, zero_stage: int, model: nn.Module,
             group_names: list[str], config: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The metadata of a checkpoint about to be saved (`train_state`: TrainState.state_dict())."""
    return {
        "version": VERSION,
        **train_state,
        "global_step": int(engine.global_steps),
        "train_batch_size": int(engine.train_batch_size()),
        "micro_batch_size": int(engine.train_micro_batch_size_per_gpu()),
        "grad_accumulation_steps": int(engine.gradient_accumulation_steps()),
        "config_hash": checkpoint.config_hash(config),
        "world_size": world_size,
        "zero_stage": zero_stage,
        "model_name": model_name(model),
        "num_parameters": num_parameters(model),
        "param_groups": list(group_names),  # the optimizer state's layout (see optim.param_groups)
        # The whole run config, as the user gave it: export rebuilds the model from its `model` section.
        "config": config,
    }


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's metadata, upgraded to the current version."""

    tag_dir: Path
    state: dict[str, Any]  # the whole (upgraded) record; TrainState.load_state_dict takes it

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    @property
    def global_step(self) -> int:
        return int(self.state["global_step"])

    @property
    def batches_done(self) -> int:
        return int(self.state.get("batches_done") or 0)

    @property
    def world_size(self) -> int:
        return int(self.state.get("world_size") or 0)

    @property
    def zero_stage(self) -> int | None:
        return self.state.get("zero_stage")

    @property
    def train_batch_size(self) -> int:
        return int(self.state.get("train_batch_size") or 0)

    @property
    def param_groups(self) -> list[str] | None:
        return self.state.get("param_groups")

    @property
    def split_groups(self) -> bool:
        """Saved before merged parameter groups: backbone and head have optimizer groups of their own."""
        return self.param_groups is None

    @property
    def config(self) -> dict[str, Any] | None:
        config = self.state.get("config")
        return config if isinstance(config, dict) else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.state.get(key, default)

    def run_config(self) -> dict[str, Any]:
        """The run config, required by export and eval (they rebuild the model from it)."""
        config = self.config
        if config is None or "model" not in config:
            raise CheckpointError(
                f"{self.tag_dir / checkpoint.MARKER} has no run config (written by an older ds_trainer); "
                "export rebuilds the model from it: resume that run for one more epoch with this version "
                "(ds-trainer train --load-dir ...) to write a checkpoint that has it"
            )
        return config


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 or version-2 record in the current layout."""
    state = dict(state)
    version = int(state.get("version") or 1)
    if version == 1:
        partial = state.get("partial_epoch")
        if isinstance(partial, list):
            names = ("loss_sum", "correct", "seen", "bad", "nonfinite")
            state["partial_epoch"] = {n: float(v) for n, v in zip(names, partial)}
        # No recorded groups: written before groups were merged, when backbone and head were always apart.
        state.setdefault("param_groups", None)
    if version < VERSION:
        state["version"] = VERSION  # version 2 differs only in recording no digests (integrity.verify warns)
    elif version > VERSION:
        raise CheckpointError(
            f"{checkpoint.MARKER} has layout version {version}; this ds_trainer reads up to {VERSION}: upgrade ds_trainer"
        )
    return state


def read(tag_dir: str | Path) -> CheckpointMeta:
    """The metadata of the checkpoint at `tag_dir` (a complete tag: see checkpoint.resolve)."""
    tag_dir = Path(tag_dir)
    path = tag_dir / checkpoint.MARKER
    try:
        raw = checkpoint.read_marker(tag_dir)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from None
    if isinstance(raw, dict):
        integrity.check_seal(raw, path)  # first: a flipped byte in a key name is damage, not another format
    if not isinstance(raw, dict) or any(key not in raw for key in _REQUIRED):
        raise CheckpointError(
            f"{path} is not a ds_trainer checkpoint record (it needs {', '.join(_REQUIRED)}); "
            "give a checkpoint directory written by ds-trainer train"
        )
    wrong = _wrong_field(raw)
    if wrong is not None:
        raise CheckpointError(
            f"{path} is not a ds_trainer checkpoint record ({wrong}); give a checkpoint directory written by "
            "ds-trainer train"
        )
    try:
        return CheckpointMeta(tag_dir, upgrade(raw))
    except CheckpointError as exc:
        raise CheckpointError(f"{tag_dir}: {exc}") from None


def _wrong_field(raw: dict[str, Any]) -> str | None:
    """What in a record has the wrong type (what the properties of CheckpointMeta would trip on), or None."""

    def count(value: Any) -> bool:
        return type(value) is int and value >= 0

    for key in _REQUIRED:
        if not count(raw[key]):
            return f"{key} is {_short(raw[key])}, not a whole number"
    for key in ("version", "world_size", "batches_done", "train_batch_size", "num_parameters"):
        if raw.get(key) is not None and not count(raw[key]):
            return f"{key} is {_short(raw[key])}, not a whole number"
    for key, kind, name in (
        ("config", dict, "a mapping"),
        ("files", dict, "a mapping"),
        ("param_groups", list, "a list"),
    ):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            return f"{key} is {_short(raw[key])}, not {name}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str)) else repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


def check_same_model(meta: CheckpointMeta, model: nn.Module, group_names: list[str] | None) -> None:
    """Refuse, before DeepSpeed's shape errors, a checkpoint of another architecture or optimizer layout.

    `group_names`: the parameter groups this run would build (None: not training, nothing to compare).
    """
    count, then_count = num_parameters(model), meta.get("num_parameters")
    if then_count is not None and int(then_count) != count:
        raise CheckpointError(
            f"{meta.tag_dir} holds a model of {int(then_count):,} parameters ({meta.get('model_name')}); this one has "
            f"{count:,} ({model_name(model)}). Resume with the model.* settings it was trained with, or start "
            "without --load-dir"
        )
    if meta.split_groups:
        log.info("%s predates merged parameter groups: backbone and head stay in separate groups", meta.tag_dir)
    elif group_names is not None and list(meta.param_groups or []) != list(group_names):
        raise CheckpointError(
            f"{meta.tag_dir} holds optimizer state for parameter groups {', '.join(meta.param_groups or [])}; this run "
            f"has {', '.join(group_names)} (training.backbone_lr_scale 1 puts backbone and head in one group, any "
            "other value splits them). Resume with the backbone_lr_scale it was trained with"
        )


@dataclass(frozen=True)
class ResumePlan:
    """How this job's engine is built to load a checkpoint."""

    grad_accumulation_steps: int | None = None  # None: the config's
    universal: bool = False  # load through DeepSpeed's universal format (another world size)
    split_groups: bool = False  # backbone and head in groups of their own (a v1 checkpoint's layout)


def ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def plan(meta: CheckpointMeta, world_size: int, micro_batch: int, config_accumulation: int) -> ResumePlan:
    old_world = meta.world_size
    if not old_world or old_world == world_size:
        return ResumePlan(split_groups=meta.split_groups)
    accumulation = None
    global_batch = meta.train_batch_size
    if global_batch:
        accumulation, rest = divmod(global_batch, micro_batch * world_size)
        if rest or accumulation < 1:
            raise ConfigError(
                f"{meta.tag_dir} trained with a global batch of {global_batch} "
                f"({meta.get('micro_batch_size')} x {meta.get('grad_accumulation_steps')} accumulation x "
                f"{old_world} ranks); on {world_size} ranks with batch_size {micro_batch} that needs "
                f"{global_batch / (micro_batch * world_size):g} accumulation steps, not a whole number. "
                f"Choose training.batch_size so that batch_size x {world_size} divides {global_batch}"
            )
        log.info(
            "resuming a %d-rank checkpoint on %s: grad_accumulation_steps %d (config: %d) keeps the "
            "global batch %d", old_world, ranks(world_size), accumulation, config_accumulation, global_batch,
        )  # fmt: skip
    universal = any(meta.tag_dir.glob("*optim_states.pt"))
    return ResumePlan(grad_accumulation_steps=accumulation, universal=universal, split_groups=meta.split_groups)


def verify_files(meta: CheckpointMeta) -> None:
    """Every file of the checkpoint against the digest its marker records, by name (collective)."""
    integrity.verify(meta.tag_dir, collective=True)


def prepare(
    meta: CheckpointMeta, world_size: int, micro_batch: int, config_accumulation: int, is_main: bool
) -> ResumePlan:
    """Before the engine is built: the plan for this world size, every file verified against its
    digest (before anything unpickles it), and the universal copy made (and verified) when the world
    size changed. Collective."""
    resume_plan = plan(meta, world_size, micro_batch, config_accumulation)
    verify_files(meta)
    if resume_plan.universal:
        integrity.verify(checkpoint.to_universal(meta.tag_dir, is_main), collective=True)
    return resume_plan


def load_engine(engine: Any, meta: CheckpointMeta, universal: bool) -> None:
    """Collective: DeepSpeed loads the model, optimizer and LR scheduler state of `meta`'s tag."""
    try:
        if universal:
            loaded, _ = engine.load_checkpoint(str(meta.tag_dir), tag=checkpoint.UNIVERSAL)
        else:
            loaded, _ = engine.load_checkpoint(str(meta.tag_dir.parent), tag=meta.tag_dir.name)
    except RuntimeError as exc:  # torch's "size mismatch" / "Missing key(s)" for another architecture
        raise CheckpointError(
            f"{meta.tag_dir} does not fit this model ({first_line(exc, 300)}); resume with the model it was "
            "trained with, or start without --load-dir"
        ) from exc
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint at {meta.tag_dir}")


# What a resume changes on purpose, never reported as a difference: more (or fewer) epochs is how a
# run is extended (the cosine case is explained where the schedule is rebuilt), and the checkpoints'
# folder is a path. Another world size is handled by the plan (its accumulation keeps the global
# batch, said in its own line), so the micro-batch and accumulation it replaces are ignored too.
ALWAYS_IGNORED = ("training.checkpoint_dir", "training.num_epochs")
ELASTIC_IGNORED = ("training.batch_size", "training.grad_accumulation_steps")


def ignored_differences(resume_plan: ResumePlan) -> tuple[str, ...]:
    return ALWAYS_IGNORED + (ELASTIC_IGNORED if resume_plan.grad_accumulation_steps is not None else ())


def nothing_to_train(epoch: int, num_epochs: int) -> str:
    of = f"of {num_epochs}" if epoch == num_epochs else f"(training.num_epochs is {num_epochs})"
    return (f"nothing to train: the checkpoint finished epoch {epoch} {of}; raise training.num_epochs "
            "(--set training.num_epochs=N) to train longer")  # fmt: skip


def continue_cosine(engine: Any, meta: CheckpointMeta, t: Any, ds_config: dict[str, Any], epoch: int,
                    is_main: bool) -> None:  # fmt: skip
    """After a resume, the cosine spans this run's num_epochs; a total other than the checkpoint's is said in one line.

    DeepSpeed restores only the scheduler's iteration, and the optimizer state holds the LR the
    checkpoint's schedule gave the next step: re-applied here, so that step already follows this
    run's schedule (else it would run at the old LR, e.g. min_lr, and only the step after jump).
    """
    sched = engine.lr_scheduler
    if t.scheduler != "cosine" or getattr(sched, "last_batch_iteration", -1) < 0:
        return
    before = float(engine.get_lr()[0])
    sched.step(sched.last_batch_iteration)
    then = ((meta.config or {}).get("training") or {}).get("num_epochs")
    if then is None or int(then) == t.num_epochs or epoch >= t.num_epochs or not is_main:
        return
    log.warning("%s", cosine_change(
        int(then), t.num_epochs, int(ds_config["scheduler"]["params"]["total_num_steps"]),
        int(engine.global_steps) + 1, before, float(engine.get_lr()[0]), t.min_lr,
    ))  # fmt: skip


def cosine_change(then_epochs: int, now_epochs: int, total_steps: int, next_step: int, lr_before: float,
                  lr_after: float, min_lr: float) -> str:  # fmt: skip
    """What a resume with another training.num_epochs does to the cosine schedule, in one line."""
    was = round(total_steps / now_epochs * then_epochs)
    return (
        f"training.num_epochs {then_epochs} -> {now_epochs}: the cosine LR schedule now spans {now_epochs} epochs "
        f"({total_steps} optimizer steps; the checkpoint's spanned {was}), as if the run had been configured so "
        f"from the start: step {next_step} runs at LR {lr_after:.3g} (the checkpoint's schedule: {lr_before:.3g}), "
        f"then the LR decays to min_lr {min_lr:g} at step {total_steps}"
    )


def warn_if_config_differs(meta: CheckpointMeta, now: dict[str, Any], *, is_main: bool,
                           ignore: tuple[str, ...] = ALWAYS_IGNORED) -> None:  # fmt: skip
    """One warning on rank 0 naming each key (then -> now) that differs, unless only ignored keys do."""
    if not is_main or meta.get("config_hash") in (None, checkpoint.config_hash(now)):
        return
    if meta.config is None:
        log.warning("the model/training/deepspeed config differs from the checkpoint's (which does not record "
                    "its keys); continuing with this one")  # fmt: skip
        return
    keys = config_differences(meta.config, now, ignore=ignore)
    if not keys:
        return
    shown = [key if key.startswith("+") else f"{key} {_at(meta.config, key)} -> {_at(now, key)}" for key in keys]
    log.warning("the config differs from the checkpoint's: %s; continuing with this run's values", ", ".join(shown))


def _at(tree: dict[str, Any] | None, dotted: str) -> str:
    value: Any = tree
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def config_differences(then: dict[str, Any] | None, now: dict[str, Any], limit: int = 8,
                       ignore: tuple[str, ...] = ("training.checkpoint_dir",)) -> list[str]:  # fmt: skip
    """The dotted keys of model/training/deepspeed that differ between two run configs (`ignore`d ones excluded)."""
    if not then:
        return []
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            out.append(prefix)

    for section in ("model", "training", "deepspeed"):
        walk(then.get(section), now.get(section), section)
    out = [key for key in out if key not in ignore]
    return out[:limit] + ([f"+{len(out) - limit} more"] if len(out) > limit else [])
