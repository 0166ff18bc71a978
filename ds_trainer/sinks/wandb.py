"""Weights & Biases: the run config without secrets, step and epoch scalars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds_trainer.errors import ConfigError
from ds_trainer.sinks.base import Sink, epoch_scalars, finite_scalars, row_step
from ds_trainer.sinks.logs import console

if TYPE_CHECKING:
    from ds_trainer.config import WandbSection

# A config key containing one of these is dropped before the config reaches W&B: its
# config is uploaded and also printed into wandb's own debug.log, even offline.
_SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password")
_WANDB_FIX = "pip install wandb==0.31.0, or set logging.wandb.enabled false"


def redact_secrets(value: Any) -> Any:
    """A copy of a config tree without values under secret-looking keys (api_key, token, ...).

    The run config goes to W&B's servers and its local logs; a credential that slipped into
    the YAML must not go with it.
    """
    if isinstance(value, dict):
        return {k: redact_secrets(v) for k, v in value.items() if not any(m in str(k).lower() for m in _SECRET_MARKERS)}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value]
    return value


def resolve_wandb_mode(mode: str | None) -> str:
    """`None` means online when WANDB_API_KEY is set, else offline (never a login prompt)."""
    if mode is not None:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _init_wandb(
    cfg: WandbSection,
    run_dir: Path | None,
    run_name: str,
    run_config: dict[str, Any] | None,
) -> Any:
    """Start the W&B run, or None for mode `disabled`; every failure is a ConfigError."""
    mode = resolve_wandb_mode(cfg.mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except Exception as exc:  # not installed, or an install that fails on import
        raise ConfigError(f"logging.wandb.enabled is true but wandb cannot be imported ({exc}); {_WANDB_FIX}") from exc
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=cfg.project,
            name=cfg.run_name or run_name,
            entity=cfg.entity,
            tags=list(cfg.tags) or None,
            dir=str(run_dir) if run_dir is not None else None,
            mode=mode,
            config=redact_secrets(run_config or {}),
            # W&B's banners would interleave with the seed's console lines.
            settings=wandb.Settings(silent=True),
        )
    except Exception as exc:
        hint = " (offline runs need no account: set logging.wandb.mode offline)"
        raise ConfigError(f"wandb.init failed in mode {mode}: {exc}{hint if mode == 'online' else ''}") from exc
    console().info("W&B run %s (%s) in %s", run.name, mode, run.dir)
    return run


class WandbSink(Sink):
    """Logs to a started W&B run (asynchronous, so `step` stays cheap); close() finishes it.

    W&B cannot forget points, so a resume's rewind leaves it alone. After close() it records nothing.
    """

    def __init__(self, run: Any) -> None:
        self._run = run

    @classmethod
    def start(
        cls, cfg: WandbSection, run_dir: Path | None, run_name: str, run_config: dict[str, Any] | None
    ) -> WandbSink | None:
        """A sink on a new W&B run, or None for mode `disabled`; every failure is a ConfigError."""
        run = _init_wandb(cfg, run_dir, run_name, run_config)
        return cls(run) if run is not None else None

    @property
    def wandb_run(self) -> Any:
        return self._run

    def step(self, global_step: int, scalars: dict[str, float]) -> None:
        finite = finite_scalars(scalars)
        if self._run is not None and finite:
            self._run.log(finite, step=int(global_step))

    def write(self, row: dict[str, Any]) -> None:
        scalars = epoch_scalars(row)
        if self._run is not None and scalars:
            self._run.log(scalars, step=row_step(row))

    def close(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish()
