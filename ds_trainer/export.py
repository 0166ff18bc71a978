"""Export a DeepSpeed checkpoint to a plain Hugging Face directory, load it back, and score images.

A DeepSpeed checkpoint is tied to DeepSpeed: under ZeRO the fp32 weights are split across one
optimizer file per rank, and the model file may hold only shapes. `export_checkpoint` turns one
into a directory any machine can use without DeepSpeed, a process group or the training world size:

    OUT/config.json, model.safetensors   the CLIP tower (`CLIPVisionModel` for fine-tune, LoRA merged
                                         into it; the whole `CLIPModel` for zero-shot/prompt-tuning)
    OUT/tokenizer files                  zero-shot/prompt-tuning only
    OUT/head.safetensors                 fine-tune: the linear head (`weight`, `bias`);
                                         prompt-tuning: the learned context (`prompt_ctx`)
    OUT/ds_trainer_export.json           how to rebuild the detector and preprocess its inputs

`load_exported` rebuilds the detector from OUT (eval mode); `predict_paths` scores image files with
exactly the evaluation preprocessing (`clip_preprocess`, eval mode). Labels: 1 = ai, 0 = nature (real).
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_trainer import checkpoint, export_files
from ds_trainer.consolidate import Source, rebuild_model, resolve_source, some_keys
from ds_trainer.errors import CheckpointError, ConfigError, DataError, first_line

log = logging.getLogger(__name__)

EXPORT_FILE = "ds_trainer_export.json"
HEAD_FILE = "head.safetensors"
FORMAT_VERSION = 1
# Exported logits must match the checkpoint's model this closely (LoRA merging reorders float sums).
VERIFY_ATOL, VERIFY_RTOL = 1e-4, 1e-3


def export_checkpoint(
    load_dir: str | Path, out: str | Path, tag: str | None = None, force: bool = False, verify: bool = True
) -> Path:
    """Write the checkpoint at `load_dir` (its `tag`, default: `checkpoint.resolve`'s pick) to `out`.

    The export is assembled in a sibling temporary directory and moved into place at the end, so an
    interrupted export never leaves a half-written `out`. With `verify`, the written directory is
    loaded back with `load_exported` and must give the checkpoint model's logits on a random batch.
    """
    out = Path(out).expanduser()
    _check_out(out, force)
    source = resolve_source(load_dir, tag)
    model = rebuild_model(source)
    probe = _probe_batch(model) if verify else None
    reference = _logits(model, probe) if probe is not None else None
    tmp = export_files.staging_dir(out)  # removes what killed exports to `out` left behind
    try:
        _write_export(model, source, tmp)
        if probe is not None:
            _verify(tmp, probe, reference)
        export_files.publish(tmp, out)  # one mode for every file (export_files.py), then the rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s, epoch %s, step %s) to %s", source.tag_dir, _mode(model),
             source.meta.get("epoch"), source.meta.get("global_step"), out)  # fmt: skip
    return out


def _check_out(out: Path, force: bool) -> None:
    """Refuse to overwrite; `force` replaces a previous export only, never an arbitrary directory."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new or empty directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(f"--out {out} is not empty; give a new or empty directory, or --force to replace an export")
    if not (out / EXPORT_FILE).is_file():
        raise ConfigError(f"--out {out} is not empty and not a ds-trainer export (no {EXPORT_FILE}); --force "
                          "only replaces a previous export, so nothing else gets deleted by mistake")  # fmt: skip


def _mode(model: nn.Module) -> str:
    return str(model.mode)


def _exported_mode(model: nn.Module) -> str:
    """The mode the export is rebuilt with: svd-residual's merged tower is a plain fine-tuned one."""
    return "fine-tune" if _mode(model) == "svd-residual" else _mode(model)


def _write_export(model: nn.Module, source: Source, out: Path) -> None:
    from safetensors.torch import save_file

    mode = _mode(model)
    clip = model.model if mode == "prompt-tuning" else model
    if mode in ("fine-tune", "svd-residual"):
        tower = clip.backbone
        merged = hasattr(tower, "merge_and_unload")
        if merged:
            tower = tower.merge_and_unload()  # plain CLIPVisionModel weights: transformers loads them as is
        if mode == "svd-residual":
            from ds_trainer.models.svd_residual import merge_svd_residual

            tower = merge_svd_residual(tower)  # W' = frozen main + trained residual, as plain q/k/v/out weights
        tower.save_pretrained(out)
        head = {"weight": clip.head.weight, "bias": clip.head.bias}
    else:
        merged = False
        clip.backbone.save_pretrained(out)
        clip.tokenizer.save_pretrained(out)
        head = {"prompt_ctx": model.prompt_ctx} if mode == "prompt-tuning" else {}
    if head:
        save_file({k: v.detach().float().contiguous().clone() for k, v in head.items()}, str(out / HEAD_FILE))
    info = _export_info(model, clip, source, lora_merged=merged)
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _export_info(model: nn.Module, clip: nn.Module, source: Source, lora_merged: bool) -> dict[str, Any]:
    from ds_trainer.data.transforms import CLIP_MEAN, CLIP_STD

    section = source.config["model"]
    size = int(model.image_size)
    data = source.config.get("data") or {}
    crop_mode = data.get("crop", "resize")
    side = data.get("resize_shortest") or size
    return {
        "format_version": FORMAT_VERSION,
        "mode": _exported_mode(model),
        "trained_mode": _mode(model),
        "num_classes": int(section.get("num_classes", 2)),
        "labels": {"0": "nature (real)", "1": "ai (generated)"},
        "prompts": {"real": clip.real_prompt, "ai": clip.ai_prompt} if _exported_mode(model) != "fine-tune" else None,
        "prompt_length": int(model.prompt_length) if _mode(model) == "prompt-tuning" else None,
        "lora_merged": lora_merged,
        "svd_residual_merged": _mode(model) == "svd-residual",
        "image_size": size,
        "preprocessing": {
            "resize": f"shortest side to {side} px, bicubic",
            "crop": f"center {size}x{size}",
            "rescale": "1/255 (RGB, alpha composited on white)",
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            # data.crop of the training run: "native" crops without resizing (tiling small images).
            "crop_mode": crop_mode,
            "resize_shortest": side if crop_mode == "resize" else None,  # data.resize_shortest (or image_size)
            "function": f"ds_trainer.data.transforms.Preprocess(image_size, crop={crop_mode!r}, "
            f"resize_shortest={side if crop_mode == 'resize' else None})(img, 0, train=False)",
        },
        "decision": decision_block(source),
        "source": {
            "checkpoint_dir": str(source.checkpoint_dir.resolve()),
            "tag": source.tag,
            "epoch": source.meta.get("epoch"),
            "global_step": source.meta.get("global_step"),
            "world_size": source.meta.get("world_size"),
            "zero_stage": source.meta.get("zero_stage"),
            "model_name": section.get("model_name"),
            "best_metric": source.meta.get("best_metric"),
            "monitor": source.meta.get("monitor"),
        },
    }


def decision_block(source: Source) -> dict[str, Any]:
    """Where predict cuts P(AI): the run's data.threshold (0.5, a number, or its calibrated one), and the
    temperature fitted on the run's holdout (predict's calibrated P(AI)) when the checkpoint has one."""
    from ds_trainer.eval_thresholds import CALIBRATED, require_calibration, stored_calibration

    mode = (source.config.get("data") or {}).get("threshold", 0.5)
    cal = stored_calibration(source.meta)
    if mode == CALIBRATED:
        require_calibration(cal, source.tag_dir, "data.threshold calibrated")
    return {
        "mode": "calibrated" if mode == CALIBRATED else "fixed",
        "threshold": cal.threshold if mode == CALIBRATED and cal is not None else float(mode),
        "temperature": cal.temperature if cal is not None else None,
        "calibration": cal.to_dict() if cal is not None else None,
    }


def _probe_batch(model: nn.Module) -> torch.Tensor:
    size = int(model.image_size)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixels).float()


def _verify(out: Path, probe: torch.Tensor, reference: torch.Tensor) -> None:
    got = _logits(load_exported(out), probe)
    diff = float((got - reference).abs().max())
    if not torch.allclose(got, reference, rtol=VERIFY_RTOL, atol=VERIFY_ATOL):
        raise CheckpointError(
            f"the export does not reproduce the checkpoint's logits (max difference {diff:.3g}); not written"
        )


# ---------------------------------------------------------------------------------------------- load
def read_export_info(path: str | Path) -> dict[str, Any]:
    """The ds_trainer_export.json of an exported directory."""
    path = Path(path).expanduser()
    info_file = path / EXPORT_FILE
    if not info_file.is_file():
        raise CheckpointError(_not_an_export(path))
    info = json.loads(info_file.read_text())
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{info_file}: format version {info['format_version']} is newer than this ds_trainer reads"
        )
    return info


def _not_an_export(path: Path) -> str:
    """Why `path` cannot be predicted with, and an export command that works as printed."""
    if not path.exists():
        return (f"exported model {path} does not exist; create it with ds-trainer export --load-dir <checkpoint> "
                f"--out {path}")  # fmt: skip
    try:
        ckpt_dir, tag = checkpoint.resolve(path)
    except CheckpointError:
        return (f"{path} has no {EXPORT_FILE}, so it is not an exported model; create one with "
                f"ds-trainer export --load-dir <checkpoint> --out <new directory>")  # fmt: skip
    # A checkpoint (or one of its tags): export refuses a non-empty --out, so never suggest `path` itself.
    out = ckpt_dir.parent / "exported" / tag
    n = 2
    while out.exists():
        out, n = ckpt_dir.parent / "exported" / f"{tag}_{n}", n + 1
    load, model = shlex.quote(str(path)), shlex.quote(str(out))
    return (f"{path} is a DeepSpeed checkpoint, not an exported model; export it first: ds-trainer export "
            f"--load-dir {load} --out {model}, then ds-trainer predict --model {model} ...")  # fmt: skip


def load_exported(path: str | Path) -> nn.Module:
    """The detector from an exported directory, on CPU in eval mode; needs transformers, not DeepSpeed.

    Built by the same `build_model` as training, pointed at the directory (LoRA is already merged),
    so its forward is the training model's: [B, num_classes] logits, softmax column 1 = ai.
    """
    from ds_trainer.config import ModelSection
    from ds_trainer.models import build_model

    path = Path(path).expanduser()
    info = read_export_info(path)
    prompts = info.get("prompts") or {}
    section = ModelSection(
        model_name=str(path), mode=info["mode"], num_classes=info["num_classes"],
        prompt_length=info.get("prompt_length") or 10,
        **({"real_prompt": prompts["real"], "ai_prompt": prompts["ai"]} if prompts else {}),
    )  # fmt: skip
    model = build_model(section)
    _load_head(model, path, info["mode"])
    model.crop_mode = (info.get("preprocessing") or {}).get("crop_mode", "resize")
    model.resize_shortest = (info.get("preprocessing") or {}).get("resize_shortest")  # older exports: image_size
    # an export written before decisions were recorded: GenImage's 0.5, no temperature
    model.decision = info.get("decision") or {"mode": "fixed", "threshold": 0.5, "temperature": None}
    return model.float().eval()


def _load_head(model: nn.Module, path: Path, mode: str) -> None:
    if mode == "zero-shot":
        return
    from safetensors.torch import load_file

    head_file = path / HEAD_FILE
    if not head_file.is_file():
        raise CheckpointError(f"exported model {path} has no {HEAD_FILE}; export it again")
    tensors = load_file(str(head_file))
    target = model.head if mode == "fine-tune" else model
    missing, unexpected = target.load_state_dict(tensors, strict=False)
    if mode == "prompt-tuning":
        missing = [k for k in missing if k == "prompt_ctx"]  # the frozen CLIP comes from the HF files
    if missing or unexpected:
        raise CheckpointError(f"{head_file}: missing {some_keys(missing)}, unexpected {some_keys(unexpected)}")


# ---------------------------------------------------------------------------------------------- predict
@dataclass
class Prediction:
    """One image's result: `p_ai` = softmax probability of class 1 (ai), or `error` when unreadable;
    `ai`: p_ai at or above the export's threshold; `p_ai_calibrated`: temperature-scaled, when the run
    fitted a temperature on its holdout."""

    path: str
    p_ai: float | None = None
    error: str | None = None
    ai: bool | None = None
    p_ai_calibrated: float | None = None


def load_image_tensor(
    path: str | Path, image_size: int, crop: str = "resize", *, uint8: bool = False, resize_shortest: int | None = None
) -> torch.Tensor:
    """One file → [3, size, size], decoded and preprocessed as evaluation does (no EXIF rotation there either);
    `uint8`: the crop's pixels, left for predict_tensors to normalise.

    Label-dependent data switches (data.align_jpeg_quality) define the training data, not the
    detector: an image to score has no label, so they do not apply here.
    """
    from ds_trainer.data.image_limits import open_checked
    from ds_trainer.data.transforms import Preprocess

    try:
        # the loader's checks: a regular file (a FIFO would block), and the one bound on an image's size
        with open_checked(path) as img:
            pre = Preprocess(image_size, crop=crop, draft=False, uint8=uint8, resize_shortest=resize_shortest)
            return pre(img, 0, train=False)
    except Exception as exc:  # noqa: BLE001 - broken images raise many types (PIL's bomb error, MemoryError ...)
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {first_line(exc)}") from None


def predict_paths(model: nn.Module, paths: Sequence[str | Path], batch_size: int = 32) -> list[Prediction]:
    """Score every path in order; unreadable files get an `error` instead of stopping the rest.

    A file is scored only if it is a regular file (a FIFO, device or folder named x.png is refused
    without being read) within the loader's bound on one image (image_limits). Symbolic links are
    followed wherever they lead: the user names these files, and predict reads nothing else.
    """
    size = int(model.image_size)
    results = [Prediction(str(p)) for p in paths]
    for chunk in _chunks(results, batch_size):
        tensors, ok = [], []
        for pred in chunk:
            try:
                tensors.append(load_image_tensor(pred.path, size, getattr(model, "crop_mode", "resize"), uint8=True,
                                                 resize_shortest=getattr(model, "resize_shortest", None)))  # fmt: skip
                ok.append(pred)
            except DataError as exc:
                pred.error = str(exc)
        if tensors:
            for pred, score in zip(ok, predict_tensors(model, torch.stack(tensors)).tolist()):
                _decide(pred, score, getattr(model, "decision", None) or {})
    return results


def _decide(pred: Prediction, score: float, decision: dict[str, Any]) -> None:
    from ds_trainer.calibration import temperature_scale

    pred.p_ai = score
    pred.ai = score >= float(decision.get("threshold", 0.5))
    if decision.get("temperature") is not None:
        pred.p_ai_calibrated = float(temperature_scale([score], float(decision["temperature"]))[0])


@torch.no_grad()
def predict_tensors(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """P(ai) [B] for preprocessed images [B, 3, H, W]: softmax column 1, as the evaluation metrics use.

    uint8 pixels are normalised with the CLIP mean/std first (transforms.normalize), float ones taken as they are.
    """
    from ds_trainer.data.transforms import normalize
    from ds_trainer.metrics import ai_scores

    return ai_scores(model(normalize(pixels) if pixels.dtype == torch.uint8 else pixels.float()))


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), max(1, n)):
        yield items[i : i + n]
