"""Test-time degradations for robustness sweeps (`ds-trainer eval --perturb KIND:LEVELS`).

A perturbation is applied by `Preprocess` in the loader workers, after the image is decoded and
converted to RGB (and, with `align_jpeg_quality`, re-encoded) and before the crop, resize and
normalisation, to real and generated images alike. Each kind at a level is a fixed function of
the pixels (no random draw), so the same image is degraded the same way on every rank and worker;
the JPEG and blur steps are the training augmentation's own (`transforms.jpeg_roundtrip`,
`transforms.gaussian_blur`), the resize is `transforms.resize_shortest`.

Kinds (what GenImage's degraded-image task and the UnivFD / AIGCDetectBenchmark sweeps do):

- `jpeg:Q`      re-encode as JPEG at quality Q (1..100, Pillow's defaults, 4:2:0);
- `blur:S`      Gaussian blur of standard deviation S px (S >= 0; 0 leaves the image as it is);
- `resize:N`    downscale (bicubic) so the shortest side is N px (N >= 8), then the usual
                preprocessing scales it back up: GenImage's low-resolution task (112 and 64);
                an image already that small is left as it is (never upscaled);
- `downscale:F` downscale both sides by the factor F (0 < F <= 1, bicubic; at least 1 px).

Presets: `genimage-degraded` = resize 112 and 64, JPEG q65 and q30, blur sigma 3 and 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ds_trainer.data.decode import MIN_IMAGE_SIDE
from ds_trainer.data.transforms import gaussian_blur, jpeg_roundtrip, resize_shortest
from ds_trainer.errors import ConfigError

KINDS = ("jpeg", "blur", "resize", "downscale")
PRESETS: dict[str, tuple[str, ...]] = {
    # GenImage (Zhu et al., 2023), the degraded-image classification task
    "genimage-degraded": ("resize:112,64", "jpeg:65,30", "blur:3,5"),
}


@dataclass(frozen=True)
class Perturbation:
    """One kind at one level; a callable PIL RGB image -> PIL RGB image (picklable, compares by value)."""

    kind: str
    level: float

    @property
    def name(self) -> str:
        """The key of its table in the eval JSON's `robustness` block, e.g. `jpeg:75`, `blur:1.5`."""
        return f"{self.kind}:{format_level(self.level)}"

    def describe(self) -> str:
        level = format_level(self.level)
        return {
            "jpeg": f"JPEG re-encoded at quality {level}",
            "blur": f"Gaussian blur, sigma {level} px",
            "resize": f"downscaled to a shortest side of {level} px",
            "downscale": f"downscaled by a factor of {level}",
        }[self.kind]

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.kind == "jpeg":
            return jpeg_roundtrip(img, int(self.level))
        if self.kind == "blur":
            return gaussian_blur(img, float(self.level))
        if self.kind == "resize":
            side = int(self.level)
            return resize_shortest(img, side) if min(img.size) > side else img
        w, h = img.size
        size = (max(1, round(w * self.level)), max(1, round(h * self.level)))
        return img if size == (w, h) else img.resize(size, Image.Resampling.BICUBIC)


def format_level(level: float) -> str:
    """3.0 -> `3`, 1.5 -> `1.5`: levels as the user wrote them."""
    return str(int(level)) if float(level).is_integer() else f"{level:g}"


def parse_perturbations(specs: Sequence[str]) -> list[Perturbation]:
    """`--perturb` values (`KIND:L1,L2,...` or a preset name) -> perturbations, in order, each once."""
    out: list[Perturbation] = []
    for spec in specs:
        for part in PRESETS.get(spec.strip(), (spec,)):
            for p in _parse_one(part):
                if p not in out:
                    out.append(p)
    return out


def _parse_one(spec: str) -> list[Perturbation]:
    kind, sep, levels = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        presets = ", ".join(PRESETS)
        raise ConfigError(
            f"--perturb {spec!r}: unknown kind {kind!r}; use KIND:LEVELS with KIND one of {', '.join(KINDS)} "
            f"(e.g. jpeg:95,75,50), or a preset: {presets}"
        )
    values = [v.strip() for v in levels.split(",")] if sep else []
    if not values or any(not v for v in values):
        raise ConfigError(f"--perturb {spec!r}: give {kind} at least one level, comma-separated, e.g. {_EXAMPLE[kind]}")
    return [Perturbation(kind, _level(kind, v, spec)) for v in values]


_EXAMPLE = {"jpeg": "jpeg:95,75,50,30", "blur": "blur:1,3,5", "resize": "resize:112,64", "downscale": "downscale:0.5"}


def _level(kind: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if kind == "jpeg":
        ok, rule = value.is_integer() and 1 <= value <= 100, "a JPEG quality is a whole number from 1 to 100"
    elif kind == "blur":
        ok, rule = math.isfinite(value) and value >= 0, "a blur sigma is a number of pixels >= 0"
    elif kind == "resize":
        ok = value.is_integer() and value >= MIN_IMAGE_SIDE
        rule = f"a resize is a shortest side in whole pixels >= {MIN_IMAGE_SIDE} (MIN_IMAGE_SIDE)"
    else:
        ok, rule = 0 < value <= 1, "a downscale factor is a number in (0, 1], e.g. 0.5"
    if not ok:
        raise ConfigError(f"--perturb {spec!r}: level {text!r} is out of range: {rule}")
    return value
