"""Language-model training: ``TrainConfig`` → ``train(config)``; ``mixerzoo train`` on the CLI.

Single process, ``torchrun`` DDP, or FSDP2 (``fsdp=True``); atomic checkpoints that resume
exactly. See :mod:`mixerzoo.train.trainer` for the loop and
:mod:`mixerzoo.train.checkpoint` for the files.
"""

from .config import ConfigError, TrainConfig
from .trainer import Trainer, TrainingError, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "TrainingError", "train"]
