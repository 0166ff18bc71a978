"""The run configuration: one YAML file with sections model, data, training, deepspeed, logging.

Loaded into a typed, validated pydantic tree. Every error names the dotted key; an unknown
key also names the closest valid one, because a typo in a YAML key would otherwise silently
fall back to a default and waste a multi-day run. Every number is finite and bounded by what
its consumer accepts (numpy's seed range, timedelta's, DeepSpeed's batch sizes), every string
and list is bounded, and error messages show at most a short prefix of a value
(`config_yaml.echo`). Reading the YAML itself (size, aliases, repeated keys) is `config_yaml`'s.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ds_trainer.config_errors import validation_message
from ds_trainer.config_model import (  # noqa: F401 - re-exported: callers import them from here
    MAX_BATCH,
    MAX_COUNT,
    MAX_ITEMS,
    MAX_PATH,
    LoraSection,
    ModelSection,
    Section,
    SvdResidualSection,
    Tag,
)
from ds_trainer.config_yaml import (
    apply_override,
    empty_config_error,
    parse_yaml,
    read_config_text,
)
from ds_trainer.errors import ConfigError

# data.eval_crops' choices; the placements are ds_trainer.data.native's (not imported here: the data
# package pulls in webdataset), and a test checks that the two agree.
EVAL_CROPS = {
    1: "centre",
    5: "four corners + centre, FiveCrop",
    10: "those of the image and of its mirror image, TenCrop",
}


class DataSection(Section):
    shards: str = Field("data_shards/demo", description="shard directory holding manifest.json")
    train_split: str = Field("train", max_length=255)  # a directory name
    val_split: str | None = Field("val", max_length=255)
    train_generators: list[str] | None = Field(None, max_length=MAX_ITEMS)
    eval_generators: list[str] | None = Field(None, max_length=MAX_ITEMS)
    image_size: int = Field(224, ge=32, le=1024)
    num_workers: int = Field(2, ge=0, le=64)
    shuffle_buffer: int = Field(1000, ge=0, le=MAX_COUNT, description="decoded samples held per loader worker")
    eval_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    # --- robustness and the benchmark protocol
    max_bad_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="fail the run when more than this fraction of an epoch's samples cannot be decoded",
    )
    holdout_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of train shards held out for model selection (GenImage's val is the test set)",
    )
    threshold: float | Literal["calibrated"] = Field(
        0.5,
        description="P(AI) at or above which an image counts as AI-generated, in validation rows, export and "
        "predict: 0.5 (what GenImage reports), another number in (0, 1), or calibrated (the threshold fitted "
        "on the holdout of the training generators; needs holdout_fraction)",
    )
    # --- bias-aware preprocessing ("Fake or JPEG?", Grommelt et al. 2024) and detector augmentations
    crop: Literal["resize", "native"] = Field(
        "resize",
        description="resize: shortest side to image_size (or resize_shortest), then crop; native: crop without "
        "resizing (tile small images)",
    )
    resize_shortest: int | None = Field(
        None, ge=32, le=1024,
        description="crop resize: the shortest side is resized to this, then the image_size crop is taken "
        "(random in training, centre at eval), e.g. 256 then 224 as UnivFD; default: image_size",
    )  # fmt: skip
    eval_crops: int = Field(
        1,
        ge=1,
        le=10,
        description="crop native only: score every eval image by the mean logits of K native crops: "
        "1 centre, 5 four corners + centre (FiveCrop), 10 those of the image and of its mirror image (TenCrop)",
    )
    align_jpeg_quality: int | None = Field(
        None,
        ge=1,
        le=100,
        description="re-encode AI images (lossless PNG in GenImage) as JPEG at this quality, like the reals",
    )
    jpeg_draft: bool = Field(
        False, description="decode large JPEGs at reduced size (faster; but only JPEGs, i.e. GenImage's reals, get it)"
    )
    blur_prob: float = Field(
        0.0, ge=0, le=1, description="train: Gaussian blur probability (CNNSpot Blur+JPEG(0.5): 0.5)"
    )
    blur_sigma: tuple[float, float] = Field((0.0, 3.0), description="train: blur sigma range")
    jpeg_prob: float = Field(0.0, ge=0, le=1, description="train: JPEG re-encoding probability (both classes)")
    jpeg_quality: tuple[int, int] = Field((30, 100), description="train: JPEG quality range")
    pin_memory: bool = Field(
        True, description="on a GPU: page-locked batches, copied to the device without blocking (no effect on CPU)"
    )
    decode: Literal["cpu", "gpu"] = Field(
        "cpu",
        description="cpu: loader workers decode and crop; gpu: they ship JPEG bytes and the crop, decoded in a batch "
        "on the device (nvJPEG through torchvision; every sample must be JPEG, e.g. after ds-trainer prepare)",
    )

    @field_validator("eval_crops")
    @classmethod
    def _check_eval_crops(cls, k: int) -> int:
        if k not in EVAL_CROPS:
            choices = ", ".join(f"{n} ({what})" for n, what in EVAL_CROPS.items())
            raise ValueError(f"{k} crops is not a supported placement; use {choices}")
        return k

    @model_validator(mode="after")
    def _check_ranges(self) -> DataSection:
        if self.threshold == "calibrated" and self.holdout_fraction <= 0:
            raise ValueError(
                "threshold calibrated is fitted on held-out training data, never on the test set: set "
                "holdout_fraction (e.g. 0.1) so there is a holdout, or use a fixed threshold such as 0.5"
            )
        if not isinstance(self.threshold, str) and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold {self.threshold:g} is a P(AI) cut: give a number in (0, 1), or calibrated")
        if self.eval_crops > 1 and self.crop != "native":
            raise ValueError(
                f"eval_crops {self.eval_crops} places crops on the image at its native resolution; "
                f"set crop: native (crop {self.crop} resizes the shortest side to the crop, so its corners "
                "would repeat the centre)"
            )
        if self.resize_shortest is not None and (self.crop != "resize" or self.resize_shortest < self.image_size):
            raise ValueError(
                f"resize_shortest {self.resize_shortest} is the side crop: resize scales to before its "
                f"image_size {self.image_size} crop: give crop: resize and a value of at least {self.image_size}"
            )
        if self.decode == "gpu":
            self._check_device_decode()
        for name in ("blur_sigma", "jpeg_quality"):
            low, high = getattr(self, name)
            if low > high or low < 0:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high, got [{low}, {high}]")
        if self.blur_sigma[1] > 100:
            raise ValueError(f"blur_sigma must stay at most 100 px, got {self.blur_sigma[1]:g}")
        if not (self.jpeg_quality[0] >= 1 and self.jpeg_quality[1] <= 100):
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {list(self.jpeg_quality)}")
        return self

    def _check_device_decode(self) -> None:
        # what the device decoder cannot do: these act on the decoded full-size image in the worker
        if self.crop != "resize":
            raise ValueError(f"decode gpu resizes on the device: it needs crop: resize, not {self.crop}")
        if self.blur_prob > 0 or self.jpeg_prob > 0:
            raise ValueError(
                f"decode gpu does not decode in the loader workers, where blur_prob ({self.blur_prob:g}) and "
                f"jpeg_prob ({self.jpeg_prob:g}) act: set both to 0, or use decode: cpu"
            )
        if self.jpeg_draft:
            raise ValueError("jpeg_draft shrinks JPEGs inside the workers' decoder; with decode gpu set it false")


# The epoch metrics a run can monitor (early stopping, `best`, the plateau scheduler).
MONITOR_METRICS = (
    "val_auc", "val_acc", "val_ap", "val_loss", "val_real_acc", "val_fake_acc", "train_loss", "train_acc",
)  # fmt: skip


class TrainingSection(Section):
    """The keys of the seed's `training:` example, then the ones it leaves implicit."""

    # --- the seed's keys
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = Field(1e-4, gt=0, le=10)
    weight_decay: float = Field(0.01, ge=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "step", "plateau", "none"] = "cosine"
    warmup_epochs: float = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    num_epochs: int = Field(10, ge=1, le=MAX_COUNT)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    grad_accumulation_steps: int = Field(1, ge=1, le=MAX_BATCH)
    checkpoint_dir: str = "results/saved_models"
    save_frequency: int = Field(1, ge=0, le=MAX_COUNT, description="save every N epochs; 0 = only the last")
    early_stopping: bool = False
    patience: int = Field(3, ge=1, le=MAX_COUNT)
    mixed_precision: bool = True
    clip_grad_norm: float | None = Field(1.0, gt=0, le=1e6)
    # --- beyond the seed
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=1000, description="backbone LR = learning_rate x this; head gets learning_rate"
    )
    step_size: int = Field(1, ge=1, le=MAX_COUNT, description="scheduler step: epochs between LR drops")
    gamma: float = Field(0.1, gt=0, le=1, description="scheduler step: LR factor at each drop")
    plateau_factor: float = Field(0.1, gt=0, lt=1, description="scheduler plateau: LR factor on a plateau")
    plateau_patience: int = Field(
        1, ge=0, le=MAX_COUNT, description="scheduler plateau: epochs without improvement before a drop"
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/Inf loss: stop (naming the step and samples) or skip that batch's update"
    )
    max_nonfinite_steps: int = Field(
        10, ge=1, le=1_000_000, description="on_nonfinite skip: fail after this many in a row"
    )
    monitor: str = Field(
        "val_auc", max_length=64, description="metric for early stopping, best and plateau (a metrics.jsonl key)"
    )
    min_delta: float = Field(
        0.0, ge=0, le=1e6, description="smallest change of the monitored metric that counts as improvement"
    )
    monitor_mode: Literal["auto", "max", "min"] = Field("auto", description="auto: min for *loss, max otherwise")
    keep_last: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="keep the K newest epoch checkpoints (never best/latest)"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> TrainingSection:
        if self.min_lr > self.learning_rate:
            raise ValueError(
                f"min_lr ({self.min_lr:g}) is above learning_rate ({self.learning_rate:g}); it must be lower or equal"
            )
        if self.warmup_epochs >= self.num_epochs and self.warmup_epochs > 0:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs:g}) must be shorter than num_epochs ({self.num_epochs})"
            )
        if self.monitor not in MONITOR_METRICS:
            close = difflib.get_close_matches(self.monitor, MONITOR_METRICS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(
                f"monitor {self.monitor!r} is not a metric; {hint}choose one of {', '.join(MONITOR_METRICS)}"
            )
        return self

    @property
    def monitor_higher_is_better(self) -> bool:
        if self.monitor_mode != "auto":
            return self.monitor_mode == "max"
        return not self.monitor.endswith("loss")


class DeepSpeedSection(Section):
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: follow training.mixed_precision and the device"
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="cpu: optimizer state in host memory (ZeRO 1-3)"
    )
    config_file: str | None = Field(None, description="a raw DeepSpeed JSON to merge; must agree with the YAML")

    @model_validator(mode="after")
    def _check_offload(self) -> DeepSpeedSection:
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs ZeRO: set zero_stage to 1, 2 or 3")
        return self


class WandbSection(Section):
    enabled: bool = False
    project: str = Field("ds_trainer", max_length=128)
    run_name: str | None = Field(None, max_length=128, description="default: the config's name")
    entity: str | None = Field(None, max_length=128)
    mode: Literal["offline", "online", "disabled"] | None = Field(
        None, description="default: online when WANDB_API_KEY is set, else offline"
    )
    tags: list[Tag] = Field(default_factory=list, max_length=64)


class LoggingSection(Section):
    run_dir: str = Field("runs/default", description="where config, metrics.jsonl and train.log go")
    log_every_n_steps: int = Field(10, ge=1, le=1_000_000)
    tensorboard: bool = Field(True, description="scalars under <run_dir>/tensorboard")
    progress_bar: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: a bar when stderr is a terminal, else plain progress lines"
    )
    mfu: bool = Field(True, description="log model FLOPs utilisation (mfu) per epoch and every log_every_n_steps")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="per-device peak for mfu; default: the GPU's bf16/fp32 table value, or a measured matmul rate on CPU",
    )
    wandb: WandbSection = Field(default_factory=WandbSection)


class DistributedSection(Section):
    timeout_s: float = Field(
        1800.0,
        ge=1,
        le=7 * 24 * 3600,  # a collective waiting a week is a hang; timedelta overflows far beyond
        description="collective timeout: a rank that stops answering fails the others after this long",
    )


class Config(Section):
    name: str = Field("run", max_length=128, description="copied into every checkpoint and the W&B run")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy's seed range")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def build_config(tree: Any, overrides: Sequence[str] = (), source: str = "<config>") -> Config:
    if tree is None:
        tree = {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(tree).__name__}")
    tree = _deep_copy(tree)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, source, Config)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    path = Path(path)
    text = read_config_text(path)
    tree = parse_yaml(text, source=str(path)) if text.strip() else None
    if tree is None:  # blank, or only comments
        raise empty_config_error(path)
    return build_config(tree, overrides, source=str(path))


def _deep_copy(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
