"""ds_trainer: DeepSpeed-accelerated training of CLIP-based AI-generated image detectors."""

from ds_trainer.config import Config, load_config
from ds_trainer.errors import CheckpointError, ConfigError, DataError, DsTrainerError
from ds_trainer.models import CLIPModel, PromptTuningWrapper
from ds_trainer.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "CLIPModel", "CheckpointError", "Config", "ConfigError", "DataError", "DsTrainerError",
    "GenImageDataset", "PromptTuningWrapper", "Trainer", "load_config",
]  # fmt: skip


def __getattr__(name: str):
    # The data package pulls in webdataset; load it only when asked for.
    if name == "GenImageDataset":
        from ds_trainer.data import GenImageDataset

        return GenImageDataset
    raise AttributeError(name)
