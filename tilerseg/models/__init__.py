"""Models: the registry (names -> smp builders) and weights loading."""
from .registry import ALIASES, LOCAL, NON_LOCAL_WHY, ModelSpec, architectures, build, canonical, global_context, is_local
from .weights import ModelInfo, Normalization, describe, instantiate, save_checkpoint

__all__ = ["ALIASES", "LOCAL", "NON_LOCAL_WHY", "ModelSpec", "ModelInfo", "Normalization", "architectures",
           "build", "canonical", "global_context", "describe", "instantiate", "is_local", "save_checkpoint"]
