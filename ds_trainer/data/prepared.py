"""Reading a prepared shard set (`ds-trainer prepare`): what its manifest says was done, and what a run may do.

The `data:` settings of a run describe the data as the load-time path would make it, on the source
set or on a prepared one alike; the loader leaves out what the set already holds. So:

* fakes prepared with `--align-jpeg Q` need `data.align_jpeg_quality: Q` (not another quality, and
  not unset: the config, which every checkpoint saves, must say what the data is, so that it gives
  the same tensors on the source set, aligned at load time, and on the prepared one); the loader
  then does not re-encode them again;
* a set prepared with `--resize-shortest N` needs `data.crop: resize` resizing to N (`data.image_size: N`, or
  `data.resize_shortest: N`), no
  Blur/JPEG training augmentation and no eval perturbation (they act before the resize at load
  time, on the full-size image, so on a pre-resized image they would not be the same operation);
* `ds-trainer eval --align-jpeg` is refused on aligned fakes (they would be compressed twice) and on
  a pre-resized set, `--perturb` and `--size-matched` (which compares file sizes) on a pre-resized set.

A refusal names the setting, the manifest's record, and what to do (ConfigError, exit 2).
With `data.jpeg_draft: true` the aligned fakes, now JPEG files, are draft-decoded as the reals are:
tensors then differ from the load-time path's, which decodes the fakes as PNG at full size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ds_trainer.errors import ConfigError, DataError

_KEYS = {"align_jpeg_quality": int, "resize_shortest": int, "store": str}


def describe(block: dict[str, Any]) -> str:
    """A prepared block in words, for logs and refusals."""
    steps = []
    if block.get("align_jpeg_quality") is not None:
        steps.append(f"fakes re-encoded as JPEG at quality {block['align_jpeg_quality']}")
    if block.get("resize_shortest") is not None:
        steps.append(f"shortest side resized to {block['resize_shortest']}")
    steps.append("stored as raw uint8 pixels" if block.get("store") == "raw" else "stored as JPEG")
    return ", ".join(steps)


def prepared_block(manifest: Any) -> dict[str, Any] | None:
    """The manifest's `prepared` block (None for a set written by `ds-trainer shard`), its types checked."""
    block = manifest.raw.get("prepared")
    if block is None:
        return None
    ok = isinstance(block, dict) and block.get("store") in ("jpeg", "raw")
    for key, kind in _KEYS.items():
        value = block.get(key) if isinstance(block, dict) else None
        ok = ok and (value is None or (isinstance(value, kind) and not isinstance(value, bool)))
    if not ok:
        raise DataError(f"{manifest.root}/manifest.json has a malformed `prepared` block; prepare the set again")
    return block


def _source(block: dict[str, Any]) -> str:
    source = block.get("source")
    name = source.get("name") if isinstance(source, dict) else None
    return f"the source set ({str(name)[:100]})" if name else "the source set"


def for_run(manifest: Any, preprocess: Any, *, train: bool) -> Any:
    """The loader's preprocessing for `manifest`'s set: `preprocess` (a transforms.Preprocess, built from
    `data:`) minus what the set already holds, or ConfigError when the two disagree.

    Anything else (None, a custom callable) is returned as it is: it reads the pixels as stored.
    """
    from ds_trainer.data.transforms import Preprocess

    block = prepared_block(manifest)
    if block is None or not isinstance(preprocess, Preprocess):
        return preprocess
    where = f"shard set {manifest.root} was prepared ({describe(block)})"
    q, n = block.get("align_jpeg_quality"), block.get("resize_shortest")
    if q is not None:
        if preprocess.align_jpeg_quality != q:
            said = preprocess.align_jpeg_quality
            said = "is unset" if said is None else f"is {said}"
            raise ConfigError(
                f"data.align_jpeg_quality {said}, but {where}; set data.align_jpeg_quality: {q} (the loader "
                f"does not re-encode them again), or use {_source(block)}"
            )
        preprocess = dataclasses.replace(preprocess, align_jpeg_quality=None)
    if n is not None:
        if preprocess.crop != "resize" or preprocess.resize_side != n:
            at = f"data.image_size {preprocess.image_size}"
            if preprocess.resize_shortest is not None:
                at = f"data.resize_shortest {preprocess.resize_shortest}"
            raise ConfigError(
                f"data.crop is {preprocess.crop} at {at}, but {where}; "
                f"set data.crop: resize and data.image_size (or data.resize_shortest): {n}, or use {_source(block)}"
            )
        if preprocess.align_jpeg_quality is not None:
            raise ConfigError(
                f"data.align_jpeg_quality is {preprocess.align_jpeg_quality}, but {where} without aligning the "
                f"fakes: at load time they would be re-encoded after the resize; prepare with --align-jpeg "
                f"{preprocess.align_jpeg_quality}, or use {_source(block)}"
            )
        if train and (preprocess.blur_prob > 0 or preprocess.jpeg_prob > 0):
            raise ConfigError(
                f"data.blur_prob {preprocess.blur_prob} / data.jpeg_prob {preprocess.jpeg_prob}: training "
                f"augmentation acts on the full-size image, but {where}; prepare without --resize-shortest, "
                f"or use {_source(block)}"
            )
        if preprocess.perturb is not None:
            raise ConfigError(f"a perturbation acts on the full-size image, but {where}; use {_source(block)}")
    return preprocess


def check_tracks(manifest: Any, tracks: Any) -> None:
    """Refuse eval tracks (an eval_tracks.EvalTracks) that a prepared set cannot give as its source would."""
    block = prepared_block(manifest)
    if block is None or tracks is None:
        return
    where = f"shard set {manifest.root} was prepared ({describe(block)})"
    q, n = block.get("align_jpeg_quality"), block.get("resize_shortest")
    if tracks.align_jpeg is not None and q is not None:
        raise ConfigError(
            f"--align-jpeg {tracks.align_jpeg}: {where}; they would be compressed twice. "
            f"Score the track on {_source(block)} (--shards PATH)"
        )
    if n is None:
        return
    asked = [flag for flag, on in (("--align-jpeg", tracks.align_jpeg is not None),
                                   ("--perturb", bool(tracks.perturbations)),
                                   ("--size-matched", tracks.size_matched)) if on]  # fmt: skip
    if asked:
        raise ConfigError(
            f"{', '.join(asked)}: {where}; these act on (or compare) the full-size images. "
            f"Score them on {_source(block)} (--shards PATH)"
        )
