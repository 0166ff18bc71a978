"""The report's most confident mistakes per generator: which images, and, where the shard set's
tars can be read, their thumbnails and source paths, pulled out of the tars by sample key."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ds_trainer.eval_results import EvalRun

log = logging.getLogger(__name__)

PER_KIND = 4  # per generator: this many real images called AI, and as many AI images called real
THUMB_PX = 112
# An image member above this is not read for a thumbnail (a report must not pull in a huge file).
MAX_MEMBER_BYTES = 64 << 20


@dataclass(frozen=True)
class Mistake:
    generator: str
    key: str | None  # None: the eval result predates keys
    label: int  # the truth: 1 = AI-generated, 0 = real
    score: float  # P(AI-generated)


@dataclass
class Mistakes:
    by_generator: dict[str, list[Mistake]]  # most confident first
    totals: dict[str, int]  # every mistake of the generator, shown or not


def confident_mistakes(run: EvalRun, threshold: float = 0.5, per_kind: int = PER_KIND) -> Mistakes:
    """Per generator, the real images with the highest P(AI) at or above `threshold` and the AI
    images with the lowest below it, `per_kind` of each (taking both kinds keeps one from hiding
    the other), most confident first: furthest from the threshold."""
    by_generator: dict[str, list[Mistake]] = {}
    totals: dict[str, int] = {}
    for g in run.generator_names:
        idx = np.flatnonzero(run.generators == g)
        s, y = run.scores[idx], run.labels[idx]
        fp = idx[(y == 0) & (s >= threshold)]
        fn = idx[(y == 1) & (s < threshold)]
        totals[g] = len(fp) + len(fn)
        # stable sorts: equal scores keep the predictions' order, so the table is reproducible
        picked = [*fp[np.argsort(-run.scores[fp], kind="stable")][:per_kind],
                  *fn[np.argsort(run.scores[fn], kind="stable")][:per_kind]]  # fmt: skip
        picked.sort(key=lambda i: -abs(run.scores[i] - threshold))
        by_generator[g] = [
            Mistake(g, None if run.keys is None else str(run.keys[i]), int(run.labels[i]), float(run.scores[i]))
            for i in picked
        ]
    return Mistakes(by_generator, totals)


@dataclass
class Samples:
    """What the shard set gave for the wanted keys: JPEG thumbnails and source paths."""

    thumbs: dict[str, bytes] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    problem: str | None = None  # why some or all could not be read, for the page


def find_samples(shards: str | Path | None, split: str | None, wanted: dict[str, set[str]],
                 size: int = THUMB_PX) -> Samples:  # fmt: skip
    """Thumbnails and source paths of `wanted` (generator -> keys) from the `split` shards of the
    shard set in `shards`. Never raises: a report without thumbnails is still a report."""
    out = Samples()
    if not any(wanted.values()):
        return out
    if not shards or not split:
        out.problem = "the eval result does not say which shard set it scored"
        return out
    from ds_trainer.data.manifest import load_manifest
    from ds_trainer.errors import DataError

    try:
        manifest = load_manifest(shards)
    except (DataError, OSError) as exc:
        out.problem = f"the shard set {shards} cannot be read here ({exc})"
        return out
    for generator, keys in wanted.items():
        missing = set(keys)
        for shard in (s for s in manifest.shards if s.split == split and s.generator == generator):
            if not missing:
                break
            listed = _sidecar_keys(Path(shard.url))
            if listed is not None and not missing & listed:
                continue  # the shard's sidecar says none of them is in it: no need to open the tar
            try:
                _read_shard(Path(shard.url), missing, size, out)
            except (OSError, tarfile.TarError) as exc:
                out.problem = f"{shard.url} cannot be read ({type(exc).__name__}: {exc})"
                log.info("report thumbnails: %s", out.problem)
        if missing and out.problem is None:
            out.problem = f"{len(missing)} of the keys are in no {split} shard of {generator} in {shards}"
    return out


def _sidecar_keys(tar_path: Path) -> set[str] | None:
    try:
        keys = json.loads(tar_path.with_suffix(".json").read_text()).get("keys")
    except (OSError, ValueError, AttributeError):
        return None
    return set(keys) if isinstance(keys, list) else None


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset groups tar members: the key ends at the basename's first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def _read_shard(tar_path: Path, missing: set[str], size: int, out: Samples) -> None:
    from ds_trainer.data.raw_pixels import RAW_KEY
    from ds_trainer.data.scan import IMAGE_KEYS

    with tarfile.open(tar_path, "r:") as tar:  # plain tar, seekable: only the wanted members are read
        for member in tar:
            key, ext = _split_name(member.name)
            if key not in missing or not member.isfile() or member.size > MAX_MEMBER_BYTES:
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            data = f.read()
            if ext == "json":
                try:
                    path = json.loads(data).get("path")
                except (ValueError, AttributeError):
                    path = None
                if isinstance(path, str):
                    out.paths[key] = path
            elif ext in IMAGE_KEYS or ext == RAW_KEY:  # RAW_KEY: a prepared set's raw pixels
                thumb = _thumbnail(ext, data, size)
                if thumb is not None:
                    out.thumbs[key] = thumb
            if key in out.thumbs and key in out.paths:
                missing.discard(key)
            if not missing:
                return
    # a key whose image was found but whose .json was not: its thumbnail is enough
    missing.difference_update(out.thumbs)


def _thumbnail(ext: str, data: bytes, size: int) -> bytes | None:
    from ds_trainer.data.decode import _open_image  # the loader's guarded opener: bombs cost a header read

    try:
        with _open_image({ext: data}) as img:
            img.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at a fraction of full size
            thumb = img.convert("RGB")
        thumb.thumbnail((size, size))
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
    except Exception as exc:  # noqa: BLE001 - a broken image gets no thumbnail, the report goes on
        log.info("report thumbnails: no thumbnail from a .%s member: %s: %s", ext, type(exc).__name__, exc)
        return None


def mistakes_html(runs: Sequence[EvalRun], mistakes: Sequence[tuple[Mistakes, Samples]], threshold: float) -> str:
    """A table per run: per generator, its most confident mistakes with key, truth, score and,
    where the shards were readable, thumbnail and source path."""
    e = html.escape
    parts = [
        "<h2>Most confident mistakes</h2><p class='muted'>Per generator, the real images called AI with the "
        f"highest P(AI) and the AI-generated images called real with the lowest (up to {PER_KIND} of each, at "
        f"threshold {threshold:g}); a key names the image in the shard set's tars, whose <code>.json</code> "
        "member holds its source path.</p>"
    ]
    for i, (run, (found, samples)) in enumerate(zip(runs, mistakes)):
        if len(runs) > 1:
            parts.append(f"<h3>{e(run.name)}</h3>")
        if run.keys is None:
            parts.append(
                "<p class='muted'>This eval result has no image keys (written before they were recorded); "
                "re-run <code>ds-trainer eval</code> to name the images.</p>"
            )
        elif samples.problem:
            parts.append(f"<p class='muted'>Thumbnails: {e(samples.problem)}.</p>")
        parts.append(
            f"<table class='mistakes' id='mistakes-{i}'><tr><th>generator</th><th class='run'>key</th>"
            "<th>truth</th><th>P(AI)</th><th class='run'>image</th></tr>"
        )
        for g, rows in found.by_generator.items():
            if not rows:
                parts.append(f"<tr><td>{e(g)}</td><td class='run muted' colspan='4'>no mistakes</td></tr>")
                continue
            for n, m in enumerate(rows):
                head = (
                    f"<td rowspan='{len(rows)}'>{e(g)}<br><span class='muted'>{len(rows)} of "
                    f"{found.totals[g]} shown</span></td>"
                    if n == 0
                    else ""
                )
                key = f"<code>{e(m.key)}</code>" if m.key else "<span class='muted'>not recorded</span>"
                source = samples.paths.get(m.key or "")
                if source:
                    key += f"<br><span class='muted'>{e(source)}</span>"
                thumb = samples.thumbs.get(m.key or "")
                image = (
                    f"<img class='thumb' alt='{e(m.key or '')}' "
                    f"src='data:image/jpeg;base64,{base64.b64encode(thumb).decode('ascii')}'>"
                    if thumb
                    else ""
                )
                parts.append(
                    f"<tr>{head}<td class='run'>{key}</td><td>{'AI' if m.label else 'real'}</td>"
                    f"<td>{m.score:.3f}</td><td class='run'>{image}</td></tr>"
                )
        parts.append("</table>")
    return "".join(parts)
