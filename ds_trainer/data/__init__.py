"""Data layer: GenImage trees -> WebDataset shards -> per-rank streaming batches."""

from ds_trainer.data.demo import build_demo_tree, make_demo_shards
from ds_trainer.data.genimage import GenImageDataset
from ds_trainer.data.manifest import Manifest, ShardInfo, load_manifest
from ds_trainer.data.pipeline import ShardLoader, make_shard_loader
from ds_trainer.data.scan import ImageRecord, scan_tree
from ds_trainer.data.shards import shard_genimage
from ds_trainer.data.transforms import CLIP_MEAN, CLIP_STD, clip_preprocess

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "GenImageDataset",
    "ImageRecord",
    "Manifest",
    "ShardInfo",
    "ShardLoader",
    "build_demo_tree",
    "clip_preprocess",
    "load_manifest",
    "make_demo_shards",
    "make_shard_loader",
    "scan_tree",
    "shard_genimage",
]
