"""Experiment tracking: the training loop's scalars, sent to every backend `train.report_to` names.

    tracker = Tracker(cfg)                      # checks the backends are installed; opens nothing yet
    tracker.log_scalars({"train/loss": 0.5}, step=0)
    tracker.close()                             # or close(failed=True): wandb marks the run failed

"tensorboard" writes event files to ``<train.log_dir>/<name>``; "wandb" starts a Weights & Biases run in
project ``train.wandb_project``, named after the config, carrying the resolved config, its files under
``<train.log_dir>/wandb`` (``WANDB_MODE=offline`` keeps it on disk). Every backend gets the same names
and values.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from chatterbox.config import ChatterBoxConfig, ConfigError, config_to_dict


def require_installed(report_to: list[str]) -> None:
    """One error line naming the install command, for a selected backend this environment lacks (the
    backends' names are their packages' names)."""
    for backend in report_to:
        try:
            importlib.import_module(backend)
        except ImportError:
            raise ConfigError(f"train.report_to names {backend!r}, which is not installed: pip install {backend} "
                              f"(requirements.txt gives the tested versions), or drop it from train.report_to"
                              ) from None


class TensorBoardLogger:
    def __init__(self, cfg: ChatterBoxConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(cfg.train.log_dir) / cfg.name))

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed: bool) -> None:  # event files have no run status
        self.writer.close()


class WandbLogger:
    def __init__(self, cfg: ChatterBoxConfig):
        import wandb

        log_dir = Path(cfg.train.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)  # wandb.init probes dir for git details; a missing one warns
        # No mode argument: WANDB_MODE (online, offline, disabled) decides.
        self.run = wandb.init(project=cfg.train.wandb_project, name=cfg.name, config=config_to_dict(cfg),
                              dir=str(log_dir))

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


class Tracker:
    """Fans each step's scalars out to the configured backends, opened at the first step (a run refused
    before training starts leaves no empty wandb run or event file); ``close`` ends them, and a later
    ``log_scalars`` opens them again."""

    def __init__(self, cfg: ChatterBoxConfig):
        require_installed(cfg.train.report_to)
        self.cfg = cfg
        self.backends: list | None = None  # None: not opened

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.backends is None:
            self.backends = [BACKENDS[name](self.cfg) for name in self.cfg.train.report_to]
        for backend in self.backends:
            backend.log_scalars(scalars, step)

    def close(self, failed: bool = False) -> None:
        for backend in self.backends or ():
            backend.close(failed)
        self.backends = None
