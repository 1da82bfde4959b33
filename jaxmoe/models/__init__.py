"""Real models: layer shapes and routing presets (``presets``), checkpoint loaders (``loaders``),
shared experts stacked with the routed ones (``shared``)."""

from jaxmoe.models.loaders import FAMILIES, CheckpointError, infer_family, load_layer
from jaxmoe.models.presets import PRESETS, ModelPreset, from_hf_config, get_preset
from jaxmoe.models.shared import stack_shared_experts, unstack_shared_experts

__all__ = ["CheckpointError", "FAMILIES", "ModelPreset", "PRESETS", "from_hf_config", "get_preset", "infer_family",
           "load_layer", "stack_shared_experts", "unstack_shared_experts"]
