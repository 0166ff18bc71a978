"""Map-style dataset straight from a GenImage folder, for users who do not shard.

Fine for small subsets and debugging; for multi-GPU training the shards + streaming loader
are faster (no per-file opens on shared filesystems) and guarantee equal epoch lengths.

Bad files are handled like the streaming loader's bad samples: an image that does not decode (a
truncated JPEG), is out of the size bounds (image_limits.open_checked) or no regular file, is logged with its path and
comes back as a `BadSample`; `GenImageDataset.collate` leaves those out of the batch and counts them
in its `bad_samples`, so the Trainer's count and its `data.max_bad_fraction` limit apply. Files that
are no images at all (`.DS_Store`, `Thumbs.db`, `.txt`) are passed over by the scan, never opened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ds_trainer.data.image_limits import open_checked
from ds_trainer.data.regular_file import open_regular
from ds_trainer.data.scan import SPLITS, ImageRecord, scan_tree
from ds_trainer.data.transforms import clip_preprocess
from ds_trainer.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadSample:
    """A file of the dataset that could not be used, and why (already logged)."""

    path: str
    reason: str


def collate(items: Sequence[tuple[Any, int] | BadSample]) -> dict[str, Any]:
    """The batch of the usable samples (`pixel_values`, `labels`); `bad_samples` counts the others.

    A batch may hold no sample at all (every file in it was bad): `labels` is then empty.
    """
    good = [item for item in items if not isinstance(item, BadSample)]
    return {
        "pixel_values": default_collate([x for x, _ in good]) if good else torch.zeros(0),
        "labels": torch.tensor([y for _, y in good], dtype=torch.long),
        "bad_samples": len(items) - len(good),
    }


class GenImageDataset(Dataset):
    """(image, label) pairs of one split of <root>/<generator>/{train,val}/{ai,nature}/.

    Label 1 = ai (generated), 0 = nature. Without `transform`, images go through
    clip_preprocess (random crop + flip for the train split, center crop otherwise). A file that
    cannot be used is logged and returned as a `BadSample`: batch with `GenImageDataset.collate`
    (the Trainer does so itself for a DataLoader left with torch's default collate).
    """

    collate = staticmethod(collate)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        generators: list[str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        image_size: int = 224,
        follow_symlinks: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; GenImage has {', '.join(SPLITS)}")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.image_size = image_size
        scan = scan_tree(root, generators, follow_symlinks=follow_symlinks)
        self.records: list[ImageRecord] = [r for r in scan.records if r.split == split]
        if not self.records:
            raise DataError(
                f"no '{split}' images under {self.root}; expected {self.root}/<generator>/{split}/{{ai,nature}}/"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Any, int] | BadSample:
        rec = self.records[index]
        img: Image.Image | None = None
        try:
            # only a regular file is opened (a FIFO would block the worker), within the one size bound
            with open_regular(rec.path) as fp:
                img = open_checked(fp)
                # load() reads the pixels, so a transform may keep the image after the file is closed
                img.load()
            if self.transform is None:
                return clip_preprocess(img, self.image_size, train=self.split == "train"), rec.label
        except Exception as exc:  # noqa: BLE001 - broken images raise many types; one bad file must not end the epoch
            if img is not None:
                img.close()
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning("skipping %s: %s", rec.path, reason)
            return BadSample(str(rec.path), reason)
        # Outside the try: an error in the user's own transform is a bug to see, not a bad file to count.
        return self.transform(img), rec.label
