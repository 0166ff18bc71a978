"""`ds-trainer prepare SRC OUT`: a shard set derived from another, with the deterministic preprocessing done once.

What the loader would redo for every sample of every epoch is done here, once per sample:

* `align_jpeg_quality` Q: the fakes (label 1, as `data.align_jpeg_quality` does at load time) are
  stored as the JPEG bytes the load-time path would decode (`transforms.jpeg_bytes` of the
  RGB image), so a prepared fake decodes to exactly the pixels `jpeg_roundtrip` gives;
* `resize_shortest` N (for `data.crop: resize` at `data.image_size` N): every image, both classes,
  resized with the loader's own `resize_shortest`;
* `store`: `jpeg` keeps an image that was not changed as its original bytes, an aligned one as its
  JPEG bytes, and one that was resized as a new JPEG at `jpeg_quality` (one more lossy encoding, both
  classes alike); `raw` stores every image as its RGB uint8 pixels (`raw_pixels`, no decoding at load).

The derived set keeps the source's layout: the same shard paths, keys, order, generators, splits and
counts (what the loader's guarantees rest on), and the manifest's `prepared` block says what was done
and from which source manifest (its SHA-256). A sample the loader would count as bad (an image that
does not decode, a label that is not 0/1) is copied unchanged, so it is counted as bad there too; a
source shard that does not give every sample its manifest counts is refused, since its samples could
not be prepared. Writing is `shard_write`'s: one shard per task in a process pool, each under a .tmp
name with a sidecar naming its plan, so a re-run resumes; the manifest is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from ds_trainer.data.decode import _label
from ds_trainer.data.image_limits import open_checked
from ds_trainer.data.manifest import MANIFEST_NAME, atomic_write_json, load_manifest
from ds_trainer.data.prepared import describe
from ds_trainer.data.rank_plan import ShardPart
from ds_trainer.data.raw_pixels import RAW_KEY, raw_bytes
from ds_trainer.data.scan import IMAGE_KEYS, is_inside
from ds_trainer.data.shard_plan import SIDECAR_VERSION
from ds_trainer.data.shard_write import TarEntry, clean_stale, default_workers, reusable_sidecar, run_jobs, write_shard
from ds_trainer.data.shards import ShardReport
from ds_trainer.data.tar_stream import UNREADABLE, read_samples
from ds_trainer.data.transforms import jpeg_bytes, resize_shortest, to_rgb
from ds_trainer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

STORES = ("jpeg", "raw")
# data.image_size's range (config.DataSection): a set pre-resized to another size serves no run
RESIZE_RANGE = (32, 1024)
DEFAULT_JPEG_QUALITY = 96  # a resized image's re-encoding without --align-jpeg: GenImage's reals are ~q96


@dataclass(frozen=True)
class Preparation:
    """What `prepare` does to every sample; `block()` is how the manifest records it."""

    align_jpeg_quality: int | None = None
    resize_shortest: int | None = None
    store: str = "jpeg"
    jpeg_quality: int | None = None  # of a resized image stored as JPEG (None: the align quality, else 96)

    def __post_init__(self) -> None:
        q, n = self.align_jpeg_quality, self.resize_shortest
        if q is not None and not 1 <= q <= 100:
            raise ConfigError(f"--align-jpeg {q}: a JPEG quality is a whole number from 1 to 100, e.g. 96")
        if n is not None and not RESIZE_RANGE[0] <= n <= RESIZE_RANGE[1]:
            raise ConfigError(
                f"--resize-shortest {n}: give data.image_size (or data.resize_shortest) of the runs that will read the set "
                f"({RESIZE_RANGE[0]} to {RESIZE_RANGE[1]}, e.g. 224)"
            )
        if self.store not in STORES:
            raise ConfigError(f"--store {self.store}: use one of {', '.join(STORES)}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality {self.jpeg_quality}: a JPEG quality is a whole number from 1 to 100")
        if self.jpeg_quality is not None and (n is None or self.store != "jpeg"):
            raise ConfigError("--jpeg-quality is the quality of a resized image stored as JPEG; "
                              "give it with --resize-shortest N and --store jpeg")  # fmt: skip
        if q is None and n is None and self.store == "jpeg":
            raise ConfigError(
                "prepare: nothing to do; give --align-jpeg Q, --resize-shortest N or --store raw "
                "(with --store jpeg alone every image would be copied unchanged)"
            )
        if self.jpeg_quality is None and n is not None and self.store == "jpeg":
            object.__setattr__(self, "jpeg_quality", q if q is not None else DEFAULT_JPEG_QUALITY)

    def block(self, source_name: str, source_digest: str) -> dict[str, Any]:
        return {
            **asdict(self),
            "align_classes": "fakes",  # what data.align_jpeg_quality re-encodes at load time
            "source": {"name": source_name, "manifest_sha256": source_digest},
        }


@dataclass(frozen=True)
class PrepareJob:
    """One source shard and where its prepared copy goes (the attributes shard_write's machinery reads)."""

    out: str
    rel: str  # the source shard's path, kept: <generator>/<split>/shard-NNNNNN.tar
    generator: str
    split: str
    source_url: str
    count: int
    ai: int
    nature: int
    digest: str
    prep: Preparation

    @property
    def sidecar_rel(self) -> str:
        return self.rel[: -len(".tar")] + ".json"


def _digest(rel: str, prep: Preparation, source_digest: str, entry: dict[str, Any], url: str) -> str:
    """The plan of one prepared shard: what is done, to which source shard (its manifest and file)."""
    try:
        stat = Path(url).stat()
        identity = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        identity = None
    counts = [entry.get(k) for k in ("count", "ai", "nature", "bytes")]
    plan = [SIDECAR_VERSION, "prepare", rel, asdict(prep), source_digest, counts, identity]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


# ---------------------------------------------------------------- one sample, one shard (in a pool worker)


def _unchanged(members: dict[str, Any], label: int | None, meta: dict[str, Any]) -> TarEntry:
    return TarEntry(members, label, str(meta.get("mode", "unknown")))


def prepare_sample(sample: dict[str, Any], prep: Preparation) -> TarEntry:
    """One raw tar sample (its members and __key__) as the prepared set stores it."""
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    members["__key__"] = sample["__key__"]
    try:
        meta = json.loads(members["json"])
        meta = meta if isinstance(meta, dict) else {}
    except (KeyError, ValueError, TypeError):
        meta = {}
    image_key = next((k for k in members if k in IMAGE_KEYS), None)
    try:
        label = _label(members)
    except (ValueError, TypeError):
        label = None
    align = prep.align_jpeg_quality is not None and label == 1
    if image_key is None or label is None or (prep.store == "jpeg" and not align and prep.resize_shortest is None):
        return _unchanged(members, label, meta)  # nothing to do, or a sample the loader counts as bad: as it was
    try:
        with open_checked(io.BytesIO(members[image_key])) as img:
            source = {"format": img.format, "width": img.width, "height": img.height}
            mode = img.mode
            img.load()
            stored, ext, pixels = None, image_key, to_rgb(img)
            if align:  # the bytes jpeg_roundtrip decodes at load time
                stored, ext = jpeg_bytes(pixels, prep.align_jpeg_quality), "jpg"
                with Image.open(io.BytesIO(stored)) as again:
                    again.load()
                    pixels = again.convert("RGB")
            resized = False
            if prep.resize_shortest is not None:
                smaller = resize_shortest(pixels, prep.resize_shortest)
                resized, pixels = smaller is not pixels, smaller
            if prep.store == "raw":
                stored, ext = raw_bytes(pixels), RAW_KEY
            elif resized:
                stored, ext = jpeg_bytes(pixels, prep.jpeg_quality), "jpg"
            size = pixels.size
    except Exception:  # noqa: BLE001 - PIL raises many types; the loader counts this sample as bad, as before
        return _unchanged(members, label, meta)
    if stored is None:  # e.g. a real whose shortest side already is N
        return _unchanged(members, label, meta)
    del members[image_key]
    members[ext] = stored
    fmt = "raw" if ext == RAW_KEY else "JPEG"
    meta.update(width=size[0], height=size[1], format=fmt, source_image=source,
                prepared={"aligned": align, "resized": resized, "store": prep.store})  # fmt: skip
    meta.setdefault("mode", mode)
    members["json"] = json.dumps(meta).encode("utf-8")
    return TarEntry(members, label, str(meta["mode"]))


def _prepared_entries(job: PrepareJob):
    part = ShardPart(url=job.source_url, generator=job.generator, count=job.count, offset=0, kept=job.count)
    read = 0
    for sample in read_samples([part], stride=1, rank=0, repeat=False, rng=None, shuffle_buffer=0):
        if sample.get(UNREADABLE):
            raise DataError(
                f"source shard {job.source_url}: sample {sample['__key__']} cannot be read (a missing or truncated "
                "tar, or a key repeated in it); re-create the source shards, then prepare again"
            )
        read += 1
        yield prepare_sample(sample, job.prep)
    if read != job.count:
        raise DataError(
            f"source shard {job.source_url} holds {read} samples, its manifest counts {job.count}; "
            "re-create the source shards, then prepare again"
        )


def _prepare_one_shard(job: PrepareJob) -> dict[str, Any]:
    # the source manifest's counts, which the loader trusts: the same samples, whatever became of them
    return write_shard(job, _prepared_entries(job), counts={"count": job.count, "ai": job.ai, "nature": job.nature})


# ---------------------------------------------------------------- the run


def prepare_shards(
    src: str | Path,
    out: str | Path,
    prep: Preparation,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> ShardReport:
    """Write the prepared copy of the shard set `src` into `out` (see the module docstring)."""
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    source = load_manifest(src)
    if source.raw.get("prepared"):
        raise ConfigError(
            f"prepare: {source.root} is itself a prepared set (from {source.raw['prepared']['source']['name']}); "
            "prepare from the source shard set, with every step at once"
        )
    out_path = Path(out)
    out_real = out_path.resolve()
    if (
        out_real == source.root
        or is_inside(str(out_real), str(source.root))
        or is_inside(str(source.root), str(out_real))
    ):
        raise ConfigError(f"prepare: OUT {out_path} and SRC {source.root} overlap; give OUT a directory of its own")
    digest = hashlib.sha256((source.root / MANIFEST_NAME).read_bytes()).hexdigest()
    jobs = []
    for info, entry in zip(source.shards, source.raw["shards"]):
        jobs.append(PrepareJob(str(out_path), info.path, info.generator, info.split, info.url, info.count, info.ai,
                               info.nature, _digest(info.path, prep, digest, entry, info.url), prep))  # fmt: skip
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest beside half-written shards
    clean_stale(out_path, {(j.generator, j.split) for j in jobs}, jobs)
    sidecars = {j.rel: sc for j in jobs if (sc := reusable_sidecar(j)) is not None}
    todo = [j for j in jobs if j.rel not in sidecars]
    if sidecars:
        logger.info("resuming: %d of %d shard(s) already prepared in %s", len(sidecars), len(jobs), out_path)
    with tqdm(total=sum(j.count for j in jobs), initial=sum(j.count for j in jobs if j.rel in sidecars),
              desc="preparing", unit="img", disable=not progress, smoothing=0.1) as bar:  # fmt: skip
        sidecars.update(run_jobs(todo, workers, bar, write=_prepare_one_shard))
    manifest = dict(source.raw)
    manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["prepared"] = prep.block(source.root.name, digest)
    manifest["shards"] = [
        {**{k: entry[k] for k in ("path", "generator", "split", "count", "ai", "nature")}, "bytes": sidecars[j.rel]["bytes"]}
        for j, entry in zip(jobs, source.raw["shards"])
    ]  # fmt: skip
    atomic_write_json(out_path / MANIFEST_NAME, manifest)
    logger.info("prepared %d shard(s) (%d kept from an earlier run), %d images: %s", len(todo), len(jobs) - len(todo),
                sum(j.count for j in jobs), describe(manifest["prepared"]))  # fmt: skip
    return ShardReport(manifest=manifest, out=out_path, written=len(todo), reused=len(jobs) - len(todo))
