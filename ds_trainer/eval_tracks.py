"""`ds-trainer eval`'s tables beside the clean one: robustness sweeps and the debiased track.

- Robustness (`--perturb`): one full pass over the val set per perturbation and level (see
  `data.perturb`), both classes degraded alike in the loader workers; the JSON's `robustness` block,
  keyed by the perturbation's name (`jpeg:75`, `blur:3`, `resize:112`, `downscale:0.5`).
- Debiased (`--align-jpeg Q [--align-classes both|fakes]`, `--size-matched`), the JSON's `debiased`
  block: `align-jpeg:Q:both` is one more pass with every image re-encoded as JPEG at quality Q
  before preprocessing (`fakes`: the generated images only, as some papers do); `size-matched`
  re-scores the clean pass on a subset, no new pass: per generator, every fake, and only the reals
  whose file width lies within the min..max width of that generator's fakes and whose height lies
  within their min..max height (both bounds inclusive).

Every extra pass turns the loader's draft decoding off (it shrinks only JPEG files, the reals), so
both classes go through the same operations; the clean pass is preprocessed as configured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ds_trainer.data.perturb import Perturbation, parse_perturbations
from ds_trainer.data.transforms import ALIGN_CLASSES, Preprocess
from ds_trainer.errors import ConfigError
from ds_trainer.metrics import format_protocol_table, per_generator_metrics

SIZE_MATCHED = "size-matched"
SIZE_RULE = (
    "per generator: all its fakes, and the reals whose width and height each lie within the min..max "
    "width and height of that generator's fakes (inclusive)"
)
OVERALL = ("val_acc", "val_real_acc", "val_fake_acc", "val_ap", "val_auc", "val_loss")


@dataclass(frozen=True)
class EvalTracks:
    """What `ds-trainer eval` scores beyond the clean pass (nothing, by default)."""

    perturbations: tuple[Perturbation, ...] = ()
    align_jpeg: int | None = None
    align_classes: str = "both"
    size_matched: bool = False

    @property
    def any(self) -> bool:
        """Whether any table beside the clean one is asked for."""
        return bool(self.perturbations) or self.align_jpeg is not None or self.size_matched

    @property
    def align_name(self) -> str:
        return f"align-jpeg:{self.align_jpeg}:{self.align_classes}"

    def align_label(self) -> str:
        who = "both classes" if self.align_classes == "both" else "the AI-generated images only"
        return f"{who} re-encoded as JPEG at quality {self.align_jpeg} before preprocessing"


def tracks_from_args(
    perturb: Sequence[str] = (), align_jpeg: str | None = None, align_classes: str | None = None,
    size_matched: bool = False,
) -> EvalTracks:  # fmt: skip
    """The CLI's flags, checked before anything is loaded (ConfigError, one line)."""
    quality = None
    if align_jpeg is not None:
        try:
            quality = int(align_jpeg)
        except ValueError:
            quality = 0
        if not 1 <= quality <= 100:
            raise ConfigError(f"--align-jpeg {align_jpeg}: a JPEG quality is a whole number from 1 to 100, e.g. 96")
    if align_classes is not None and quality is None:
        raise ConfigError("--align-classes says which classes --align-jpeg re-encodes; give --align-jpeg Q too")
    classes = align_classes or "both"
    if classes not in ALIGN_CLASSES:
        raise ConfigError(f"--align-classes {classes}: use one of {', '.join(ALIGN_CLASSES)}")
    return EvalTracks(tuple(parse_perturbations(perturb)), quality, classes, size_matched)


def pass_block(row: dict[str, Any]) -> dict[str, Any]:
    """One pass's numbers in the eval JSON's shape (the clean result's `generators` and `overall`)."""
    return {
        "samples": row["val_samples"], "bad_samples": row["val_bad_samples"],
        "overall": {k[len("val_"):]: row[k] for k in OVERALL}, "generators": row.get("val_generators", {}),
    }  # fmt: skip


def run_tracks(
    evaluate: Callable[[Iterable], dict[str, Any]],
    make_loader: Callable[[Preprocess], Iterable],
    base: Preprocess,
    tracks: EvalTracks,
    clean: dict[str, Any] | None,
) -> dict[str, Any]:
    """Collective (every rank): the `robustness` and `debiased` blocks that `tracks` asks for.

    `evaluate(loader)` is one pass over all ranks (Trainer.evaluate); `make_loader(preprocess)` this
    rank's val loader with that preprocessing; `clean` the clean pass's predictions.
    """
    base = dataclasses.replace(base, draft=False)
    out: dict[str, Any] = {}
    if tracks.perturbations:
        out["robustness"] = {}
        for p in tracks.perturbations:
            block = pass_block(evaluate(make_loader(dataclasses.replace(base, perturb=p))))
            level = int(p.level) if float(p.level).is_integer() else p.level
            out["robustness"][p.name] = {"kind": p.kind, "level": level, "label": p.describe(), **block}
    debiased: dict[str, Any] = {}
    if tracks.align_jpeg is not None:
        aligned = dataclasses.replace(base, align_jpeg_quality=tracks.align_jpeg, align_classes=tracks.align_classes)
        debiased[tracks.align_name] = {"label": tracks.align_label(), **pass_block(evaluate(make_loader(aligned)))}
    if tracks.size_matched:
        debiased[SIZE_MATCHED] = size_matched_block(clean or {})
    if debiased:
        out["debiased"] = debiased
    return out


def fake_size_ranges(
    sizes: Sequence[tuple[int, int]], labels: Sequence[int], generators: Sequence[str]
) -> dict[str, dict[str, list[int]]]:
    """Per generator with fakes: the min..max width and height of its fakes."""
    wh, y, g = np.asarray(sizes, dtype=np.int64).reshape(-1, 2), np.asarray(labels), np.asarray(generators)
    ranges = {}
    for name in sorted(set(g.tolist())):
        fakes = wh[(g == name) & (y == 1)]
        if len(fakes):
            ranges[name] = {"width": [int(fakes[:, 0].min()), int(fakes[:, 0].max())],
                            "height": [int(fakes[:, 1].min()), int(fakes[:, 1].max())]}  # fmt: skip
    return ranges


def size_matched_mask(
    sizes: Sequence[tuple[int, int]], labels: Sequence[int], generators: Sequence[str]
) -> tuple[np.ndarray, dict[str, dict[str, list[int]]]]:
    """Which images the size-matched table scores (see SIZE_RULE), and each generator's fake range."""
    wh, y, g = np.asarray(sizes, dtype=np.int64).reshape(-1, 2), np.asarray(labels), np.asarray(generators)
    ranges = fake_size_ranges(sizes, labels, generators)
    keep = y == 1
    for name, r in ranges.items():
        (w0, w1), (h0, h1) = r["width"], r["height"]
        inside = (wh[:, 0] >= w0) & (wh[:, 0] <= w1) & (wh[:, 1] >= h0) & (wh[:, 1] <= h1)
        keep |= (g == name) & (y == 0) & inside
    return keep, ranges


def size_matched_block(pred: dict[str, Any]) -> dict[str, Any]:
    """The size-matched table from the clean pass's predictions (score, label, generator, size)."""
    if pred.get("size") is None or pred.get("generator") is None:
        raise ConfigError("--size-matched needs the streaming shard loader, which records each image's size")
    s, y, g = np.asarray(pred["score"]), np.asarray(pred["label"]), np.asarray(pred["generator"])
    keep, ranges = size_matched_mask(pred["size"], y, g)
    names = sorted(set(g.tolist()))
    return {
        "label": "reals size-matched to the fakes", "rule": SIZE_RULE, "samples": int(keep.sum()),
        "fake_size_range": ranges,
        "reals_kept": {n: int(((g == n) & (y == 0) & keep).sum()) for n in names},
        "reals_total": {n: int(((g == n) & (y == 0)).sum()) for n in names},
        "generators": per_generator_metrics(s[keep], y[keep], g[keep].tolist()),
    }  # fmt: skip


def format_tracks(blocks: dict[str, Any]) -> str:
    """The printed tables, each under a line that says what it is."""
    parts = []
    for name, b in (blocks.get("robustness") or {}).items():
        parts.append(f"robustness {name}: {b['label']}, both classes ({b['samples']} samples)")
        parts.append(format_protocol_table(b["generators"]) if b["generators"] else "(no generator names)")
    for name, b in (blocks.get("debiased") or {}).items():
        head = f"debiased {name}: {b['label']} ({b['samples']} samples)"
        if name == SIZE_MATCHED:
            kept = ", ".join(f"{g} {b['reals_kept'][g]}/{b['reals_total'][g]}" for g in b["reals_kept"])
            head += f"; {SIZE_RULE}; reals kept: {kept}"
        parts.append(head)
        parts.append(format_protocol_table(b["generators"]) if b["generators"] else "(no images)")
    return "\n".join(parts)
