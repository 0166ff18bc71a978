"""ds_trainer: DeepSpeed-accelerated training of CLIP-based AI-generated image detectors."""

from ds_trainer import cpu_info
from ds_trainer.ops import pin_build_env

# Before anything can load a DeepSpeed op: this environment's own op directory and ninja, for this
# process and every process it starts (the launcher's ranks, their builds). See ds_trainer/ops.py.
pin_build_env()
# DeepSpeed's op loads ask py-cpuinfo (a 1 s subprocess) twice each: once per machine instead.
cpu_info.install()

from ds_trainer.config import Config, load_config  # noqa: E402
from ds_trainer.errors import CheckpointError, ConfigError, DataError, DsTrainerError  # noqa: E402
from ds_trainer.models import CLIPModel, PromptTuningWrapper  # noqa: E402
from ds_trainer.trainer import Trainer  # noqa: E402

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
