"""Models: the architecture table and registry, and weights loading."""
from .detect import detect
from .registry import (ALIASES, FILE_ARCHS, ARCHITECTURES, Arch, ModelSpec, arch, architectures, build, canonical, global_context,
                       is_local, is_volumetric)
from .weights import (SHIPPED_DEMO, ModelInfo, Normalization, demo_weights, describe, dtype_scale, instantiate,
                      resolve_weights, save_checkpoint)

__all__ = ["ALIASES", "FILE_ARCHS", "detect", "ARCHITECTURES", "Arch", "SHIPPED_DEMO", "ModelSpec", "ModelInfo", "Normalization", "arch", "architectures",
           "build", "canonical", "demo_weights", "dtype_scale", "global_context", "describe", "instantiate", "is_local", "is_volumetric",
           "resolve_weights", "save_checkpoint"]
