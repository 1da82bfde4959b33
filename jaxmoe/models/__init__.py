"""Real models: layer shapes and routing presets (``presets``)."""

from jaxmoe.models.presets import PRESETS, ModelPreset, from_hf_config, get_preset

__all__ = ["ModelPreset", "PRESETS", "get_preset", "from_hf_config"]
