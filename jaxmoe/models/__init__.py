"""Real models: layer shapes and routing presets (``presets``), checkpoint loaders (``loaders``)."""

from jaxmoe.models.loaders import FAMILIES, CheckpointError, infer_family, load_layer
from jaxmoe.models.presets import PRESETS, ModelPreset, from_hf_config, get_preset

__all__ = ["CheckpointError", "FAMILIES", "ModelPreset", "PRESETS", "from_hf_config", "get_preset", "infer_family",
           "load_layer"]
