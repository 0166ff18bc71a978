"""Map-style dataset straight from a GenImage folder, for users who do not shard.

Fine for small subsets and debugging; for multi-GPU training the shards + streaming loader
are faster (no per-file opens on shared filesystems) and guarantee equal epoch lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ds_trainer.data.scan import SPLITS, ImageRecord, scan_tree
from ds_trainer.data.transforms import clip_preprocess
from ds_trainer.errors import DataError


class GenImageDataset(Dataset):
    """(image, label) pairs of one split of <root>/<generator>/{train,val}/{ai,nature}/.

    Label 1 = ai (generated), 0 = nature. Without `transform`, images go through
    clip_preprocess (random crop + flip for the train split, center crop otherwise).
    """

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
                f"no '{split}' images under {self.root}; "
                f"expected {self.root}/<generator>/{split}/{{ai,nature}}/"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Any, int]:
        rec = self.records[index]
        img = Image.open(rec.path)
        # load() reads the pixels and closes the file, so a transform may keep the image
        img.load()
        if self.transform is not None:
            return self.transform(img), rec.label
        return clip_preprocess(img, self.image_size, train=self.split == "train"), rec.label
