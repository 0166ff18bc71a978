"""What a GPU user needs from the loader: img/s per core and cores per GPU, on GenImage-like mixes.

Two mixes of distinct synthetic images (`synthetic_images.py`: smooth fields, shapes, blur and
noise, each from its own seed; no copies), half fakes and half reals, written as real shard sets
with `shard_genimage` (what `ds-trainer shard` runs):

- SD v1.4: fakes 512² PNG, reals JPEG q96 of ImageNet-like sizes around 500x375;
- Midjourney: fakes 1024² PNG, the same reals.

Each set is read by the streaming train loader (`make_shard_loader(train=True)`, the `Preprocess`
that `ds-trainer train` builds from its `data:` section, `data.jpeg_draft` off as by default, uint8
batches as it ships them) under each preprocessing users run: the defaults (`crop: resize` to 224),
`crop: native`, `align_jpeg_quality: 96`, and Blur+JPEG(0.5) augmentation (`blur_prob` = `jpeg_prob`
= 0.5), at 1 and 2 workers. The baseline ("today" in the issue's targets) is the SD mix at default
settings read as the loader was when issue 14 was filed: the same code with its two per-sample changes
undone, Pillow decoding every image and the worker shipping float batches normalised with the CLIP
mean/std. The SD mix is also read as prepared shards (`ds-trainer prepare`): `--align-jpeg 96` (JPEG),
`--align-jpeg 96 --store raw`, and `--align-jpeg 96 --resize-shortest 224 --store raw`, with
`align_jpeg_quality: 96` (the load-time path they replace). Every variant runs once per round, rounds
alternate; a variant's rate is the steady state (after every worker delivered a batch).

Demand: the forward + backward FLOPs per image of CLIP ViT-B/32 and ViT-L/14 (the released
architectures, random init, built offline), counted as the Trainer counts them (`flops.FlopTally`
around forward + loss and around backward of one real CPU micro-batch), at 40 % of an H200's dense
bf16 peak (`flops.GPU_PEAK_TFLOPS`). cores per GPU = demand / img/s per core.

    python benchmarks/loader.py                     # 2,000 images per mix, 3 rounds
    python benchmarks/loader.py --images 2000 --rounds 2
    python benchmarks/loader.py --quick --out /tmp/loader.json     # smoke test, about a minute
    python benchmarks/loader.py --rerender benchmarks/results/loader.json   # the tables again, from its numbers

The generated shard sets are cached under `--cache` (default: the temp dir), keyed by their
parameters, so a rerun only measures. The result goes to benchmarks/results/loader.json (`--out`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import md_table, write_result  # noqa: E402 - importable once the folder is on sys.path
from synthetic_images import write_genimage_tree  # noqa: E402

from ds_trainer.config import DataSection  # noqa: E402
from ds_trainer.data import make_shard_loader  # noqa: E402
from ds_trainer.data.prepare import Preparation, prepare_shards  # noqa: E402
from ds_trainer.data.shards import shard_genimage  # noqa: E402
from ds_trainer.data.transforms import Preprocess  # noqa: E402
from ds_trainer.flops import GPU_PEAK_TFLOPS, FlopTally  # noqa: E402

CACHE_VERSION = 1  # bump when the images or the sets change
QUALITY = 96
MIXES = {"sd": ("SD v1.4", 512), "mj": ("Midjourney", 1024)}  # fakes' side
SETTINGS = {  # name -> data: section keys a user sets
    "default": {},
    "crop native": {"crop": "native"},
    "align_jpeg_quality 96": {"align_jpeg_quality": QUALITY},
    "Blur+JPEG 0.5": {"blur_prob": 0.5, "jpeg_prob": 0.5},
}
PREPARED = {  # mix -> name -> (Preparation, the setting the run keeps)
    "sd": {
        "prepared align 96 (JPEG)": (Preparation(QUALITY), "align_jpeg_quality 96"),
        "prepared align 96, raw": (Preparation(QUALITY, None, "raw"), "align_jpeg_quality 96"),
        "prepared align 96 + resize 224, raw": (Preparation(QUALITY, 224, "raw"), "align_jpeg_quality 96"),
    },
    "mj": {"prepared resize 224, raw": (Preparation(None, 224, "raw"), "default")},
}
MODELS = {  # vision_config of the released checkpoints (config.json on the hub)
    "ViT-B/32": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "patch_size": 32, "image_size": 224, "hidden_act": "quick_gelu"},
    "ViT-L/14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "patch_size": 14, "image_size": 224, "hidden_act": "quick_gelu"},
}  # fmt: skip
GPU, MFU = "H200", 0.40
BEFORE = "default, before item 2"  # Pillow decoding, float batches: the loader as issue 14 found it
TODAY = ("sd", "source", BEFORE)  # the baseline of the item-3 ratios ("today's img/s" in the issue)


def torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


# ---------------------------------------------------------------- demand: FLOPs the Trainer counts
def count_flops(arch: dict[str, Any]) -> dict[str, float]:
    """Forward + loss and backward FLOPs per image of the fine-tune CLIPModel with this vision config.

    The model is `ds_trainer.models.CLIPModel` itself (tower + linear head), its tower built from the
    config with random init instead of downloaded, counted by `FlopTally` around one real CPU
    micro-batch of 1 image (a ViT's FLOPs are linear in the batch). On the CPU, SDPA runs
    `_scaled_dot_product_flash_attention_for_cpu`, which torch's FLOP counter has no formula for,
    so the CPU count lacks the attention matmuls; on a GPU the Trainer's count has them (flash /
    efficient / cuDNN SDPA have formulas). `attention` adds them with torch's own formulas for those
    kernels (`sdpa_flop_count`, `sdpa_backward_flop_count`: 2 matmuls forward, 5 backward with the
    recompute), so `total` is what the Trainer counts on the H200. (A meta-device count runs SDPA's
    math decomposition instead: 2 + 4 attention matmuls, none missing, hence above the CPU count.)
    """
    from unittest import mock

    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ds_trainer.models import clip

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**arch, attn_implementation="sdpa"))
    with mock.patch.object(clip, "load_vision_tower", return_value=tower):
        model = clip.CLIPModel("random-init", mode="fine-tune")
    model.train()
    x, y = torch.randn(1, 3, arch["image_size"], arch["image_size"]), torch.zeros(1, dtype=torch.long)
    tally = FlopTally()
    with tally.count():  # as loop.py: around forward + loss, then around backward
        loss = torch.nn.functional.cross_entropy(model(x), y)
    with tally.count():
        loss.backward()
    heads = arch["num_attention_heads"]
    qkv = (1, heads, (arch["image_size"] // arch["patch_size"]) ** 2 + 1, arch["hidden_size"] // heads)
    attention = arch["num_hidden_layers"] * (
        sdpa_flop_count(qkv, qkv, qkv) + sdpa_backward_flop_count(qkv, qkv, qkv, qkv)
    )
    return {
        "flop_tally_cpu": float(tally.total),
        "attention": float(attention),
        "total": float(tally.total + attention),
    }


def demand(cache: Path) -> dict[str, dict[str, float]]:
    """{model: {gflop, img_s}} at MFU of the GPU's dense bf16 peak; the counts cached in `cache`."""
    path = cache / f"flops-v{CACHE_VERSION}-torch{torch_version()}.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    peak = GPU_PEAK_TFLOPS[GPU][0] * 1e12
    out = {}
    for name, arch in MODELS.items():
        if name not in known:
            known[name] = count_flops(arch)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=1))
        count = known[name]
        out[name] = {
            "gflop": count["total"] / 1e9,
            "img_s": MFU * peak / count["total"],
            "gflop_cpu_tally": count["flop_tally_cpu"] / 1e9,
            "gflop_attention": count["attention"] / 1e9,
        }
    return out


# ---------------------------------------------------------------- the shard sets
def build_sets(cache: Path, counts: dict[str, int], workers: int) -> dict[tuple[str, str], Path]:
    """{(mix, kind): shard set}: kind `source`, or a PREPARED name of the mix. Cached when complete."""
    root = cache / f"loader-v{CACHE_VERSION}-q{QUALITY}"
    sets: dict[tuple[str, str], Path] = {}
    for mix, images in counts.items():
        shards = root / f"{mix}-n{images}-source"
        if not (shards / "manifest.json").is_file():
            src = root / f"{mix}-n{images}-src"
            shutil.rmtree(src, ignore_errors=True)
            t0 = time.perf_counter()
            fakes, reals = images - images // 2, images // 2
            write_genimage_tree(src, mix, fakes, reals, MIXES[mix][1], seed=1 + list(MIXES).index(mix), real_seed=0,
                                real_quality=QUALITY, workers=workers)  # fmt: skip
            # a few shards per worker, so plan_rank gives every worker of the largest count work
            shard_genimage(src, shards, max_count=max(4, -(-images // 8)), workers=workers, progress=False)
            shutil.rmtree(src)
            print(f"{mix}: wrote and sharded {images} images in {time.perf_counter() - t0:.0f}s", flush=True)
        sets[mix, "source"] = shards
    for mix in counts:
        for i, (name, (prep, _)) in enumerate(PREPARED[mix].items()):
            out = root / f"{mix}-n{counts[mix]}-prepared{i}"
            if not (out / "manifest.json").is_file():
                prepare_shards(sets[mix, "source"], out, prep, workers=workers, progress=False)
            sets[mix, name] = out
    return sets


# ---------------------------------------------------------------- timing
def _pillow_and_float(preprocess: Preprocess, img: Any, **kwargs: Any) -> Any:
    return preprocess(img, **kwargs)


def before_item2(data: DataSection) -> Any:
    """The preprocessing of the loader as issue 14 found it: float batches normalised in the worker
    (`uint8=False`), and Pillow decoding every image, since `fast_decode.fast_formats` gives a callable
    that is not a `Preprocess` no faster decoder (Pillow then decodes lazily, on the first pixel read)."""
    return functools.partial(_pillow_and_float, Preprocess.from_config(data, draft=data.jpeg_draft, uint8=False))


def steady_rate(shards: Path, setting: str, workers: int, args: argparse.Namespace, epoch: int) -> float:
    """Steady-state img/s of the train loader `ds-trainer train` builds for this `data:` section."""
    d = DataSection(shards=str(shards), num_workers=workers, **SETTINGS.get(setting, {}))
    pre = before_item2(d) if setting == BEFORE else Preprocess.from_config(d, draft=d.jpeg_draft, uint8=True)
    loader = make_shard_loader(
        d.shards, d.train_split, batch_size=args.batch_size, train=True, num_workers=d.num_workers,
        image_size=d.image_size, shuffle_buffer=args.shuffle_buffer, seed=0, pin_memory=d.pin_memory,
        preprocess=pre,
    )  # fmt: skip
    loader.set_epoch(epoch)
    warm = max(loader.plan().num_workers, 1)
    if len(loader) < warm + args.batches:
        raise SystemExit(f"{shards}: {len(loader)} batches; timing {args.batches} after {warm} needs more --images")
    start, timed = 0.0, 0
    for i, batch in enumerate(loader):
        if i == warm - 1:
            start = time.perf_counter()
        elif i >= warm:
            timed += batch["pixel_values"].shape[0]
            # at least --batches, and at least --min-seconds where the epoch has enough (fast variants)
            if i + 1 - warm >= args.batches and time.perf_counter() - start >= args.min_seconds:
                break
    return timed / (time.perf_counter() - start)


def variants(mixes: list[str], workers: list[int]) -> list[tuple[str, str, str, int]]:
    """(mix, set kind, setting, workers) in the order each round runs them."""
    out = [(*TODAY[:2], BEFORE, w) for w in workers]
    out += [(m, "source", s, w) for m in mixes for s in SETTINGS for w in workers]
    out += [(m, name, setting, w) for m in mixes for name, (_, setting) in PREPARED[m].items() for w in workers]
    return out


# ---------------------------------------------------------------- report
def _label(mix: str, kind: str, setting: str) -> str:
    return f"{kind}, data {setting}" if kind != "source" else setting


def report(args: argparse.Namespace, argv: list[str] | None, rates: dict, need: dict, sets_s: float) -> None:
    workers = args.worker_counts
    keys = list(rates)
    med = {k: statistics.median(v) for k, v in rates.items()}
    per_core = {k: med[k] / k[3] for k in keys}
    # ratios per round to today's row (SD default before item 2, same workers), then the median: robust to a
    # shared machine
    ratio = {k: statistics.median(a / b for a, b in zip(rates[k], rates[(*TODAY, k[3])])) for k in keys}
    b32, l14 = need["ViT-B/32"]["img_s"], need["ViT-L/14"]["img_s"]
    rows = [[MIXES[k[0]][0], _label(*k[:3]), k[3], f"{med[k]:.1f}", f"{min(rates[k]):.1f}-{max(rates[k]):.1f}",
             f"{per_core[k]:.1f}", f"x{ratio[k]:.2f}", f"{b32 / per_core[k]:.0f}", f"{l14 / per_core[k]:.1f}"]
            for k in keys]  # fmt: skip
    table = md_table(["mix", "shards, setting", "workers", "img/s", "range", "img/s per core", "vs today",
                      "cores/GPU ViT-B/32", "cores/GPU ViT-L/14"], rows)  # fmt: skip
    # per core from the fewest workers (one core each); more workers on this shared 2-core machine share cores
    # with the main process and the other tenants, so their scaling is shown beside it, not used for cores/GPU
    top, most = min(workers), max(workers)

    def scaling(k: tuple) -> str:
        return f"{per_core[(*k[:3], most)] / per_core[k]:.2f}" if most != top else "-"

    cores = md_table(
        ["mix", "shards, setting", f"img/s per core ({top} worker{'s' * (top > 1)})", "ViT-B/32 cores/GPU",
         "ViT-L/14 cores/GPU", f"per-core scaling at {most} workers"],
        [[MIXES[k[0]][0], _label(*k[:3]), f"{per_core[k]:.1f}", f"{b32 / per_core[k]:.0f}", f"{l14 / per_core[k]:.1f}",
          scaling(k)] for k in keys if k[3] == top],
    )  # fmt: skip
    today = per_core[(*TODAY, top)]
    targets = []

    def target(what: str, value: float, goal: float, shown: str) -> None:
        targets.append([what, shown, "met" if value >= goal else "**missed**"])

    default = ("sd", "source", "default", top)
    target("SD v1.4 default ≥ 1.5× today's img/s per core", ratio[default], 1.5,
           f"x{ratio[default]:.2f} ({per_core[default]:.1f} img/s per core, today {today:.1f})")  # fmt: skip
    if "sd" in args.mix_list:
        aligned = ("sd", "prepared align 96 (JPEG)", "align_jpeg_quality 96", top)
        raw = ("sd", "prepared align 96 + resize 224, raw", "align_jpeg_quality 96", top)
        load_time = ("sd", "source", "align_jpeg_quality 96", top)
        target(
            "prepared (JPEG-aligned) ≥ 2.5× today",
            ratio[aligned],
            2.5,
            f"x{ratio[aligned]:.2f} (x{per_core[aligned] / per_core[load_time]:.2f} load-time align 96)",
        )
        target("prepared raw ≥ 1,250 img/s per core", per_core[raw], 1250,
               f"{per_core[raw]:.0f} img/s per core (x{ratio[raw]:.2f} today, x{per_core[raw] / per_core[load_time]:.2f} "
               f"load-time align 96); resize 224 + raw; this CPU")  # fmt: skip
    if "mj" in args.mix_list:
        mj = ("mj", "source", "default", top)
        target("ViT-L/14 on Midjourney ≤ 8 cores per GPU, data defaults", 8 / (l14 / per_core[mj]), 1.0,
               f"{l14 / per_core[mj]:.1f} cores per GPU")  # fmt: skip
        mj_prepared = ("mj", "prepared resize 224, raw", "default", top)
        target("ViT-L/14 on Midjourney ≤ 8 cores per GPU, prepared `--resize-shortest 224 --store raw`",
               8 / (l14 / per_core[mj_prepared]), 1.0, f"{l14 / per_core[mj_prepared]:.1f} cores per GPU")  # fmt: skip
    demand_t = md_table(
        ["model", f"GFLOP per image, fwd + bwd, as the Trainer counts on the {GPU}", "FlopTally on CPU",
         "+ SDPA attention", f"img/s per {GPU} at {MFU:.0%} MFU"],
        [[m, f"{v['gflop']:.1f}", f"{v['gflop_cpu_tally']:.1f}", f"{v['gflop_attention']:.1f}", f"{v['img_s']:,.0f}"]
         for m, v in need.items()],
    )  # fmt: skip
    now = per_core[default]
    summary = (f"SD v1.4 default {now:.1f} img/s per core ({top} worker; today {today:.1f}): {b32 / now:.0f} cores "
               f"per {GPU} for ViT-B/32, {l14 / now:.1f} for ViT-L/14; "
               f"{sum(t[2] == 'met' for t in targets)}/{len(targets)} item-3 targets met")  # fmt: skip
    made = f" ({sets_s:.0f} s to make or load the sets)" if sets_s else ""
    markdown = (
        f"{demand_t}\n\n**Cores per GPU** (img/s per core measured at {top} worker; scaling = img/s per core at "
        f"{most} workers over that, on this shared 2-core machine):\n\n{cores}\n\n"
        f"**Issue 14 item-3 targets** (today = this run's SD v1.4 row `{BEFORE}`: default settings, Pillow "
        f"decoding, float batches normalised in the worker, as the loader was when the issue was filed):\n\n"
        f"{md_table(['target', 'measured', ''], targets)}\n\n**Every variant:**\n\n{table}\n\n"
        f"{args.images} distinct images in the SD v1.4 mix, {args.mj_images} in the Midjourney mix (half fakes: "
        f"SD v1.4 512² PNG, Midjourney 1024² PNG; half reals: JPEG q{QUALITY} ~500x375, the same in both mixes), sharded with `shard_genimage`{made}, read by `make_shard_loader(train=True)` with the `Preprocess` of `ds-trainer train` "
        f"(224 px, `jpeg_draft` off, uint8 batches), batch {args.batch_size}, shuffle buffer {args.shuffle_buffer}; "
        f"{args.batches}+ timed batches per variant after every worker's first (at least {args.min_seconds:g} s where the "
        f"epoch allows); median and range of "
        f"{args.rounds} rounds, every variant once per round. img/s per core = img/s / workers (the main process "
        f"only collates). `vs today` is the median over rounds of the ratio to that round's `{BEFORE}` row at "
        f"the same workers. cores/GPU = the model's demand / img/s per core. One run on a shared 2-core machine: "
        f"read ratios; absolute rates and the cores they imply are for scale (a GPU host's cores differ)."
    )
    write_result("loader", args.out, argv, summary, markdown, demand=need, targets=targets, sets_s=sets_s,
                 settings={k: getattr(args, k) for k in ("images", "mj_images", "rounds", "batch_size", "batches",
                                                         "min_seconds", "shuffle_buffer", "worker_counts", "mix_list",
                                                         "quick")},
                 rows=[{"mix": k[0], "shards": k[1], "setting": k[2], "workers": k[3], "img_s": rates[k],
                        "median_img_s": med[k], "img_s_per_core": per_core[k], "vs_today": ratio[k],
                        "cores_per_gpu": {"ViT-B/32": b32 / per_core[k], "ViT-L/14": l14 / per_core[k]}}
                       for k in keys])  # fmt: skip


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="distinct images per mix, half fakes (default 2000)")
    p.add_argument(
        "--mj-images",
        type=int,
        default=500,
        help="distinct images in the Midjourney mix (its 1024² PNGs take ~0.7 s each to make here)",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over every variant")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=10, help="timed batches per variant, after worker start-up")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="time each variant at least this long, epoch allowing (fast variants: 10 batches are ~0.3 s)")  # fmt: skip
    p.add_argument("--shuffle-buffer", type=int, default=32, help="data.shuffle_buffer (memory, not cost per sample)")
    p.add_argument("--workers", default="1,2", help="data.num_workers values, comma-separated")
    p.add_argument("--mixes", default="sd,mj", help="sd (SD v1.4), mj (Midjourney)")
    p.add_argument("--prep-workers", type=int, default=2, help="processes that generate, shard and prepare")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ds_trainer_bench"),
                   help="where the generated shard sets and FLOP counts are kept between runs")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke test: 48 + 32 images, batch 8, 2 batches, 1 round")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/loader.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.mj_images, args.rounds, args.batch_size, args.batches, args.min_seconds = 48, 32, 1, 8, 2, 0
    args.worker_counts = [int(w) for w in args.workers.split(",")]
    args.mix_list = [m.strip() for m in args.mixes.split(",")]
    if any(m not in MIXES for m in args.mix_list) or "sd" not in args.mix_list:
        p.error(f"--mixes {args.mixes}: give sd (today's baseline) and optionally mj")
    if min(args.worker_counts) < 1 or min(args.images, args.mj_images) < 16 or args.rounds < 1:
        p.error("--workers must be >= 1, --images and --mj-images >= 16, --rounds >= 1")
    return args


def rerender(path: str, argv: list[str] | None) -> None:
    """Rewrite a result's tables from its own measurements (after a change to the report, not to the timing)."""
    old = json.loads(Path(path).read_text())
    args = argparse.Namespace(**{"min_seconds": 0.0, **old["settings"]}, out=path)
    rates = {(r["mix"], r["shards"], r["setting"], r["workers"]): r["img_s"] for r in old["rows"]}
    report(args, shlex.split(old["command"])[2:], rates, old["demand"], old.get("sets_s", 0.0))


def main(argv: list[str] | None = None) -> None:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["--rerender"] and len(given) == 2:
        return rerender(given[1], argv)
    args = _parse(argv)
    cache = Path(args.cache)
    t0 = time.perf_counter()
    counts = {"sd": args.images, "mj": args.mj_images}
    sets = build_sets(cache, {m: counts[m] for m in args.mix_list}, args.prep_workers)
    sets_s = time.perf_counter() - t0
    need = demand(cache)
    print("demand: " + ", ".join(f"{m} {v['gflop']:.1f} GFLOP -> {v['img_s']:,.0f} img/s" for m, v in need.items()))
    rates: dict[tuple[str, str, str, int], list[float]] = {k: [] for k in variants(args.mix_list, args.worker_counts)}
    for r in range(args.rounds):
        for mix, kind, setting, workers in rates:
            rate = steady_rate(sets[mix, kind], setting, workers, args, epoch=r)
            rates[mix, kind, setting, workers].append(rate)
            print(f"round {r + 1}/{args.rounds} {mix} {_label(mix, kind, setting)} w{workers}: {rate:.1f} img/s",
                  flush=True)  # fmt: skip
    report(args, argv, rates, need, sets_s)


if __name__ == "__main__":
    main()
