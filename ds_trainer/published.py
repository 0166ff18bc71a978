"""Published GenImage results as data: `ds_configs/recipes/published.json`, read and checked.

Each entry is one paper's (or one re-implementation's) numbers on the SD v1.4 protocol: accuracy
per generator where the source prints cells, the printed mean, AP where given, the source and
whether the authors or someone else ran it. Papers label generators their own way (Midjourney,
SD1.4, ...); `generator_key` maps those labels to the GenImage release's folder names, which are
the generator keys of a shard set (`ds-trainer shard` keeps the folder names). The mean a
comparison uses is computed from the cells (Effort prints 91.1 over cells averaging 90.09).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_trainer.errors import ConfigError, DataError

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "ds_configs" / "recipes" / "published.json"
MAX_BYTES = 1 << 20
# The GenImage release's generator folders (the shard set's generator keys), in the papers' column order.
GENIMAGE_GENERATORS = (
    "Midjourney", "stable_diffusion_v_1_4", "stable_diffusion_v_1_5", "ADM", "glide", "wukong", "VQDM", "BigGAN",
)  # fmt: skip
# Paper labels (normalised: lower case, no spaces, dots, dashes or underscores) -> generator key.
_ALIASES = {
    "midjourney": "Midjourney", "mj": "Midjourney",
    "sd14": "stable_diffusion_v_1_4", "sdv14": "stable_diffusion_v_1_4", "stablediffusionv14": "stable_diffusion_v_1_4",
    "sd15": "stable_diffusion_v_1_5", "sdv15": "stable_diffusion_v_1_5", "stablediffusionv15": "stable_diffusion_v_1_5",
    "adm": "ADM", "glide": "glide", "wukong": "wukong", "vqdm": "VQDM", "biggan": "BigGAN",
}  # fmt: skip
NUMBERS_BY = ("authors", "re-implementation")
_TEXT_KEYS = ("method", "paper", "source", "numbers_by")
_KNOWN_KEYS = {*_TEXT_KEYS, "recipe", "accuracy", "ap", "mean_printed", "mean_ap_printed", "note"}


def _norm(label: str) -> str:
    return re.sub(r"[\s._\-]", "", label.lower())


def generator_key(label: str) -> str | None:
    """The GenImage generator key a paper's column label (or a shard set's generator name) names."""
    return _ALIASES.get(_norm(label))


@dataclass(frozen=True)
class Published:
    name: str
    method: str
    paper: str
    source: str
    numbers_by: str
    recipe: str | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # generator key -> %
    ap: dict[str, float] = field(default_factory=dict)
    mean_printed: float | None = None
    mean_ap_printed: float | None = None
    note: str | None = None

    @property
    def mean_computed(self) -> float | None:
        """The unweighted mean of the cells (None without all 8)."""
        if set(self.accuracy) != set(GENIMAGE_GENERATORS):
            return None
        return sum(self.accuracy.values()) / len(self.accuracy)


def _percent(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where} must be a number (percent), got {str(value)[:40]!r}")
    if not 0 <= value <= 100:
        raise DataError(f"{where} must be a percentage in [0, 100], got {value:g}")
    return float(value)


def _cells(raw: Any, where: str) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{where} must be a non-empty mapping of generator -> percent")
    cells: dict[str, float] = {}
    for label, value in raw.items():
        key = generator_key(str(label))
        if key is None:
            raise DataError(
                f"{where}: unknown generator {str(label)[:40]!r}; GenImage's are {', '.join(GENIMAGE_GENERATORS)}"
            )
        if key in cells:
            raise DataError(f"{where}: generator {key} is given twice")
        cells[key] = _percent(value, f"{where}.{label}")
    return cells


def _entry(name: str, raw: Any, where: str) -> Published:
    if not isinstance(raw, dict):
        raise DataError(f"{where} must be a mapping, got {type(raw).__name__}")
    if unknown := sorted(set(raw) - _KNOWN_KEYS):
        raise DataError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(_KNOWN_KEYS))}")
    for key in _TEXT_KEYS:
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise DataError(f"{where}.{key} is required (a non-empty string)")
    if raw["numbers_by"] not in NUMBERS_BY:
        raise DataError(f"{where}.numbers_by must be one of {', '.join(NUMBERS_BY)}, got {raw['numbers_by'][:40]!r}")
    acc = _cells(raw.get("accuracy"), f"{where}.accuracy")
    ap = _cells(raw.get("ap"), f"{where}.ap")
    mean = raw.get("mean_printed")
    if not acc and mean is None:
        raise DataError(f"{where}: give accuracy per generator, mean_printed, or both")
    return Published(
        name=name, method=raw["method"], paper=raw["paper"], source=raw["source"], numbers_by=raw["numbers_by"],
        recipe=raw.get("recipe"), accuracy=acc, ap=ap,
        mean_printed=None if mean is None else _percent(mean, f"{where}.mean_printed"),
        mean_ap_printed=None if raw.get("mean_ap_printed") is None
        else _percent(raw["mean_ap_printed"], f"{where}.mean_ap_printed"),
        note=raw.get("note"),
    )  # fmt: skip


def load_published(path: str | Path | None = None) -> dict[str, Published]:
    """Every entry of a published-results file (default: the shipped one), validated."""
    path = Path(path).expanduser() if path is not None else DEFAULT_FILE
    if not path.is_file():
        raise DataError(f"published results file {path} does not exist")
    if path.stat().st_size > MAX_BYTES:
        raise DataError(f"{path} is larger than {MAX_BYTES} bytes; a published-results file is a few kB")
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(tree, dict) or tree.get("version") != 1 or not isinstance(tree.get("entries"), dict):
        raise DataError(f'{path}: expected {{"version": 1, "entries": {{name: {{...}}}}}}')
    if not tree["entries"]:
        raise DataError(f"{path} has no entries")
    return {str(n): _entry(str(n), raw, f"{path.name}: entries.{n}") for n, raw in tree["entries"].items()}


def reference(name: str, path: str | Path | None = None) -> Published:
    """One entry by name; an unknown name is refused with the known ones listed."""
    entries = load_published(path)
    if name not in entries:
        raise ConfigError(f"no published reference {name[:64]!r}; known: {', '.join(sorted(entries))}")
    return entries[name]


def for_recipe(recipe: str, path: str | Path | None = None) -> list[str]:
    """The entries whose `recipe` is this recipe's name (a file's stem), authors' numbers first."""
    entries = load_published(path).values()
    return [e.name for e in sorted(entries, key=lambda e: e.numbers_by != "authors") if e.recipe == recipe]
