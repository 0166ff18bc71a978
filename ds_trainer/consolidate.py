"""A checkpoint's fp32 weights and the detector they belong to, without DeepSpeed's process group.

`resolve_source` finds the checkpoint (`checkpoint.resolve`'s pick, or a named tag) and reads its
metadata (resume.read); `consolidated_state_dict` merges the fp32 weights of any ZeRO stage and world
size; `rebuild_model` builds the run's model from its saved config with those weights. `export`,
`eval` and the tests use them.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_trainer import checkpoint, integrity, resume, tags
from ds_trainer.errors import CheckpointError
from ds_trainer.resume import CheckpointMeta

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class Source:
    """A resolved checkpoint: `checkpoint_dir/tag` and its metadata (resume.read's)."""

    checkpoint_dir: Path
    tag: str
    meta: CheckpointMeta

    @property
    def tag_dir(self) -> Path:
        return self.checkpoint_dir / self.tag

    @property
    def config(self) -> dict[str, Any]:
        """The run config the checkpoint was trained with (export and eval rebuild the model from it)."""
        return self.meta.run_config()


def resolve_source(load_dir: str | Path, tag: str | None = None) -> Source:
    """The checkpoint to export: `checkpoint.resolve`'s pick, or `tag` inside `load_dir` when given."""
    if tag is None:
        ckpt_dir, tag = checkpoint.resolve(load_dir)
    else:
        tags.check_name(tag, "--tag")  # before anything is opened
        ckpt_dir = Path(load_dir).expanduser()
        if not ckpt_dir.is_dir():
            raise CheckpointError(f"checkpoint {load_dir} does not exist")
        tag_dir = tags.tag_dir(ckpt_dir, tag, "--tag")
        if (tag_dir / checkpoint.MARKER).is_file():
            integrity.read_sealed(tag_dir / checkpoint.MARKER)
        if bad := checkpoint.problems(tag_dir):
            what, why = ("an incomplete", f"{bad[0]}; ") if tag_dir.is_dir() else ("no", "")
            raise CheckpointError(
                f"{what} checkpoint {tag!r} in {ckpt_dir} ({why}complete tags: {_complete_tags(ckpt_dir)}); "
                "a checkpoint is complete once ds_trainer.json is written next to DeepSpeed's files"
            )
    meta = resume.read(ckpt_dir / tag)
    meta.run_config()  # refuse a checkpoint without one here, before any work
    return Source(ckpt_dir, tag, meta)


def _complete_tags(ckpt_dir: Path) -> str:
    names = sorted(d.name for d in ckpt_dir.iterdir()
                   if tags.stays_inside(ckpt_dir, d) and d.is_dir() and checkpoint.is_complete(d))  # fmt: skip
    return ", ".join(names) or "none"


def consolidated_state_dict(source: Source, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint, from any world size, without a process group.

    Which files exist says how DeepSpeed saved it (looked at for 0.19.8):
    - ZeRO 1-3 (fp32 or bf16): fp32 master partitions in `*zero_pp_rank_*_optim_states.pt`, one per
      rank; DeepSpeed's `zero_to_fp32` merges them. Frozen weights have no master: at ZeRO 2/3 the
      model file records them (`frozen_param_fragments`, merged by zero_to_fp32), but at ZeRO 1
      DeepSpeed records none and they are only in the model file's `module` (see `_frozen_from_module`).
    - ZeRO 0, fp32: `mp_rank_00_model_states.pt`'s `module` is the full fp32 model.
    - ZeRO 0, bf16/fp16: `module` is half precision; the fp32 masters are the optimizer's
      `fp32_groups_flat`, one flat tensor per parameter group (see `_unflatten_masters`).
    """
    tag_dir = source.tag_dir
    integrity.verify(tag_dir)  # before anything unpickles the files
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        return _frozen_from_module(_from_zero_partitions(source), tag_dir, model)
    model_file = tag_dir / MODEL_STATES
    if not model_file.is_file():
        found = ", ".join(sorted(p.name for p in tag_dir.iterdir())) or "nothing"
        raise CheckpointError(f"{tag_dir} has neither ZeRO optimizer files nor {MODEL_STATES} (found: {found})")
    saved = torch.load(model_file, map_location="cpu", weights_only=True)  # tensors and plain containers only
    module = saved["module"]
    floats = [v for v in module.values() if v.is_floating_point()]
    if all(v.dtype == torch.float32 for v in floats):
        return dict(module)
    masters = (saved.get("optimizer") or {}).get("fp32_groups_flat")
    if masters is None:
        log.warning("%s: no fp32 master weights; exporting the %s weights upcast to fp32", tag_dir, floats[0].dtype)
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    return _unflatten_masters(module, masters, model, source)


def _from_zero_partitions(source: Source) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()  # zero_to_fp32 prints progress and tqdm bars; stdout is the user's channel
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(str(source.checkpoint_dir), source.tag)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{source.tag_dir}: DeepSpeed could not consolidate the ZeRO checkpoint: {exc}") from None
    log.debug("zero_to_fp32: %s", quiet.getvalue().strip())
    return state


def _frozen_from_module(state: dict[str, torch.Tensor], tag_dir: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Add the parameters zero_to_fp32 left out (ZeRO 1's frozen ones) from the model file's `module`.

    DeepSpeed (0.19.8) writes `frozen_param_fragments` only when it partitions gradients (ZeRO 2/3),
    so a ZeRO-1 linear probe's merged state has the head alone; its `module` holds the whole model
    (fp32, or the half-precision copy, upcast: frozen weights never changed, so nothing is lost).
    """
    wanted = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = [n for n in wanted if n not in state]
    model_file = tag_dir / MODEL_STATES
    if not missing or not model_file.is_file():
        return state
    module = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    for name in missing:
        value = module.get(name)
        if value is not None and value.numel() and value.shape == wanted[name].shape:
            state[name] = value.float() if value.is_floating_point() else value
    return state


def _unflatten_masters(
    module: dict[str, torch.Tensor], masters: list[torch.Tensor], model: nn.Module, source: Source
) -> dict[str, torch.Tensor]:
    """Split ZeRO-0 mixed precision's flat fp32 masters back into named tensors.

    DeepSpeed's FP16_Optimizer flattens each parameter group's trainable parameters in order with no
    padding; the groups are `optim.param_groups`' for the rebuilt model (same code, same names).
    Frozen weights have no master copy and are upcast from the half-precision module.
    """
    from ds_trainer import optim
    from ds_trainer.config import TrainingSection

    names = {id(p): n for n, p in model.named_parameters()}
    # The run's own training settings decide the groups (backbone_lr_scale 1 merges backbone and head).
    training = TrainingSection.model_validate(source.config.get("training", {}))
    groups = [[names[id(p)] for p in g["params"]]
              for g in optim.param_groups(model, training, split_parts=source.meta.split_groups)]  # fmt: skip
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if len(groups) != len(masters):
        raise CheckpointError(f"{source.tag_dir}: {len(masters)} fp32 master groups, the model has {len(groups)}")
    for group, flat in zip(groups, masters):
        sizes = [state[n].numel() for n in group]
        if sum(sizes) != flat.numel():
            raise CheckpointError(
                f"{source.tag_dir}: an fp32 master group holds {flat.numel()} values, expected {sum(sizes)}"
            )
        for name, chunk in zip(group, flat.float().split(sizes)):
            state[name] = chunk.view_as(state[name]).clone()
    return state


def rebuild_model(source: Source) -> nn.Module:
    """The detector of the checkpoint's run, with the checkpoint's fp32 weights, on CPU in eval mode."""
    from pydantic import ValidationError

    from ds_trainer.config import ModelSection
    from ds_trainer.models import build_model

    try:
        section = ModelSection.model_validate(source.config["model"])
    except ValidationError as exc:  # a config layout from another version
        raise CheckpointError(
            f"{source.tag_dir}: the saved model config is not valid for this version: {exc}"
        ) from None
    model = build_model(section)
    state = consolidated_state_dict(source, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source.tag_dir} does not match the model its config builds ({section.mode}, {section.model_name}): "
            f"missing {some_keys(missing)}, unexpected {some_keys(unexpected)}"
        )
    return model.float().eval()


def some_keys(keys: Sequence[str]) -> str:
    return f"{len(keys)} keys" + (f" (e.g. {', '.join(list(keys)[:3])})" if keys else "")
