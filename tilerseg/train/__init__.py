"""Training and evaluation: ``tilerseg train`` and ``tilerseg eval``.

* :mod:`.config`: the options, from YAML (``pipelines/``) and flags.
* :mod:`.data`: image/mask pairs as lazy readers; random crops.
* :mod:`.augment`: albumentations presets ``light``/``medium``/``heavy``.
* :mod:`.loop`: the training loop, logs and checkpoints.
* :mod:`.evaluate`: scores through the tiled engine.
* :mod:`.metrics`: IoU, Dice and pixel error from confusion matrices.
* :mod:`.challenge`: the ISBI 2012 challenge's adapted Rand error, variation
  of information and warping error (whole images).
"""
from .config import TrainConfig, load_train_config
from .evaluate import evaluate
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "load_train_config", "train"]
