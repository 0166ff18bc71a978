"""Where a loader worker's time goes: the profile behind the issue-14 targets the loader misses.

The variants of `loader.py` whose targets are missed (SD v1.4 at defaults, the load-time and the
prepared JPEG alignment, the prepared raw + resize-224 set, Midjourney at defaults) are read by the
same train loader with `num_workers=0`, so every stage runs in this process where it can be timed:

- **stages**: the loader's own steps (the header read, PNG decode by pyspng, JPEG decode by
  simplejpeg, the raw `.npy` read, Pillow's decode / RGB conversion, the JPEG round trip of
  alignment, the bicubic resize, crop + flip, the uint8 tensor `ds-trainer train` ships, collation), each wrapped with a clock
  that counts its exclusive time (a stage called inside another is taken out of the outer one);
  what no stage covers (the tar read, webdataset's plumbing, the shuffle buffer, per-sample rngs)
  is `other`. ms per image = a stage's time / images decoded.
- **functions**: a second pass of the same batches under cProfile, its top functions by self time,
  as a check on the stage grouping.

A worker process runs this same code, so a stage's share here is its share in a worker.

    python benchmarks/loader_profile.py                 # 400 SD + 320 MJ images, 8 batches of 32
    python benchmarks/loader_profile.py --quick --out /tmp/profile.json    # smoke test

Shard sets come from `loader.py`'s cache (`--cache`); the result goes to
benchmarks/results/loader_profile.json (`--out`).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import loader as bench  # noqa: E402 - the sets, settings and names of loader.py
from common import md_table, write_result  # noqa: E402
from PIL import Image  # noqa: E402

from ds_trainer.config import DataSection  # noqa: E402
from ds_trainer.data import decode, fast_decode, make_shard_loader, pipeline, transforms  # noqa: E402
from ds_trainer.data.transforms import Preprocess  # noqa: E402

# (mix, set kind, setting) of loader.py: the rows its item-3 targets read
PROFILED = [
    ("sd", "source", "default"),
    ("sd", "source", "align_jpeg_quality 96"),
    ("sd", "prepared align 96 (JPEG)", "align_jpeg_quality 96"),
    ("sd", "prepared align 96 + resize 224, raw", "align_jpeg_quality 96"),
    ("mj", "source", "default"),
]
# stage -> (owner, attribute) of the functions it times; owners hold the name the loader calls
STAGES: dict[str, list[tuple[Any, str]]] = {
    "header read (open_checked)": [(decode, "open_checked")],
    "PNG decode (pyspng)": [(fast_decode, "_png")],
    "JPEG decode (simplejpeg)": [(fast_decode, "_jpeg")],
    "raw .npy read": [(decode, "raw_image")],
    "Pillow decode + RGB (to_rgb)": [(transforms, "to_rgb")],
    "JPEG round trip (align)": [(transforms, "jpeg_roundtrip")],
    "resize (bicubic)": [(Image.Image, "resize")],
    "crop + flip": [(Image.Image, "crop"), (Image.Image, "transpose")],
    "to tensor": [(transforms, "to_uint8_tensor"), (transforms, "to_normalized_tensor")],
    "collate": [(pipeline, "collate")],
}
OTHER = "other (tar read, webdataset, shuffle buffer, rngs)"
TOP_FUNCTIONS = 8


class StageClock:
    """Exclusive wall time per stage: a stage's time without the stages called inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inner: list[float] = []  # per open stage: time spent in stages it called

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                inner = self._inner.pop()
                self.seconds[stage] += took - inner
                self.calls[stage] += 1
                if self._inner:
                    self._inner[-1] += took

        return timed

    @contextmanager
    def installed(self, stages: dict[str, list[tuple[Any, str]]] = STAGES) -> Iterator[StageClock]:
        """Wrap every stage's functions where the loader looks them up; put them back after."""
        saved = []
        try:
            for stage, places in stages.items():
                for owner, name in places:
                    original = getattr(owner, name)
                    saved.append((owner, name, original))
                    setattr(owner, name, self.wrap(stage, original))
            yield self
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)


def _loader(shards: Path, setting: str, args: argparse.Namespace) -> Any:
    """The train loader `ds-trainer train` builds for this `data:` section (uint8 batches, as `run.build_loaders`),
    in this process (num_workers 0)."""
    d = DataSection(shards=str(shards), num_workers=0, **bench.SETTINGS[setting])
    loader = make_shard_loader(
        d.shards, d.train_split, batch_size=args.batch_size, train=True, num_workers=0, image_size=d.image_size,
        shuffle_buffer=args.shuffle_buffer, seed=0, pin_memory=False, preprocess=Preprocess.from_config(d, draft=d.jpeg_draft, uint8=True),
    )  # fmt: skip
    if len(loader) < args.batches:
        raise SystemExit(f"{shards}: {len(loader)} batches; profiling {args.batches} needs more --images")
    loader.set_epoch(0)
    return loader


def _read(loader: Any, batches: int) -> int:
    """Read `batches` batches; the images delivered."""
    images = 0
    for i, batch in enumerate(loader):
        images += batch["pixel_values"].shape[0]
        if i + 1 == batches:
            break
    return images


def profile_variant(shards: Path, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """Stage times of one pass, then the top functions of a second pass of the same batches under cProfile."""
    clock = StageClock()
    with clock.installed():
        loader = _loader(shards, setting, args)
        t0 = time.perf_counter()
        delivered = _read(loader, args.batches)
        total = time.perf_counter() - t0
    decoded = clock.calls["to tensor"]  # every image preprocessed, the shuffle buffer's included
    stages = {s: clock.seconds.get(s, 0.0) for s in STAGES}
    stages[OTHER] = total - sum(stages.values())
    profiler = cProfile.Profile()
    loader = _loader(shards, setting, args)
    profiler.enable()
    _read(loader, args.batches)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive, self s, cumulative s, callers)}
    profiled_total = sum(v[2] for v in stats.values())
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:TOP_FUNCTIONS]
    return {
        "images_delivered": delivered, "images_decoded": decoded, "seconds": total,
        "img_s": decoded / total, "stages_s": stages,
        "functions": [{"function": _function_name(k), "self_s": v[2], "share": v[2] / profiled_total, "calls": v[0]}
                      for k, v in top],
    }  # fmt: skip


def _function_name(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~":  # a C function: its name says where it lives
        return name.strip("<>")
    parts = Path(file).parts
    where = "/".join(parts[parts.index("site-packages") + 1 :] if "site-packages" in parts else parts[-2:])
    return f"{name} ({where}:{line})"


def report(args: argparse.Namespace, argv: list[str] | None, rows: dict[tuple[str, str, str], dict]) -> None:
    keys = list(rows)
    cols = [f"{bench.MIXES[k[0]][0]}: {bench._label(*k)}" for k in keys]
    stage_rows = []
    for stage in [*STAGES, OTHER]:
        if all(rows[k]["stages_s"][stage] == 0 for k in keys):
            continue
        stage_rows.append([stage, *(_cell(rows[k], stage) for k in keys)])
    stage_rows.append(
        ["**total**", *(f"**{1000 / rows[k]['img_s']:.2f} ms** ({rows[k]['img_s']:.0f} img/s)" for k in keys)]
    )
    stages_t = md_table(["stage: ms per image (share)", *cols], stage_rows)
    tops = []
    for k, col in zip(keys, cols):
        fns = "; ".join(f"`{f['function']}` {f['share']:.0%}" for f in rows[k]["functions"][:5])
        tops.append([col, fns])
    top_t = md_table(
        ["variant", f"top functions by self time under cProfile (of {TOP_FUNCTIONS} kept in the JSON)"], tops
    )
    lead = {k: max((s for s in rows[k]["stages_s"] if s != OTHER), key=lambda s: rows[k]["stages_s"][s]) for k in keys}
    summary = "; ".join(f"{bench.MIXES[k[0]][0]} {bench._label(*k)}: {lead[k]} "
                        f"{rows[k]['stages_s'][lead[k]] / rows[k]['seconds']:.0%}" for k in keys)  # fmt: skip
    markdown = (
        f"{stages_t}\n\n{top_t}\n\n"
        f"One process (`num_workers: 0`, the code a worker runs), {args.batches} batches of {args.batch_size} "
        f"from each set of `loader.py` ({args.images} SD v1.4 images, {args.mj_images} Midjourney), shuffle buffer "
        f"{args.shuffle_buffer}; ms per image = the stage's exclusive time / images preprocessed (the shuffle "
        f"buffer's included). `other` is the pass's time that no stage covers. The cProfile pass reads the same "
        f"batches again; its shares are of its own total (profiling overhead included)."
    )
    write_result("loader_profile", args.out, argv, summary, markdown,
                 settings={k: getattr(args, k) for k in ("images", "mj_images", "batch_size", "batches", "shuffle_buffer", "quick")},
                 rows=[{"mix": k[0], "shards": k[1], "setting": k[2], **rows[k]} for k in keys])  # fmt: skip


def _cell(row: dict[str, Any], stage: str) -> str:
    seconds = row["stages_s"][stage]
    return f"{1000 * seconds / row['images_decoded']:.2f} ({seconds / row['seconds']:.0%})"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400, help="distinct images in the SD v1.4 set (loader.py's --images)")
    p.add_argument("--mj-images", type=int, default=320, help="distinct images in the Midjourney set")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="batches read per variant and pass")
    p.add_argument("--shuffle-buffer", type=int, default=32)
    p.add_argument("--prep-workers", type=int, default=2, help="processes that generate, shard and prepare")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ds_trainer_bench"),
                   help="loader.py's cache of generated shard sets")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke test: 48 + 32 images, batch 8, 2 batches")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/loader_profile.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.mj_images, args.batch_size, args.batches = 48, 32, 8, 2
    if min(args.images, args.mj_images) < 16 or args.batches < 1:
        p.error("--images and --mj-images must be >= 16, --batches >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    sets = bench.build_sets(Path(args.cache), {"sd": args.images, "mj": args.mj_images}, args.prep_workers)
    rows = {}
    for mix, kind, setting in PROFILED:
        rows[mix, kind, setting] = row = profile_variant(sets[mix, kind], setting, args)
        print(f"{mix} {bench._label(mix, kind, setting)}: {row['img_s']:.1f} img/s in one process", flush=True)
    report(args, argv, rows)


if __name__ == "__main__":
    main()
