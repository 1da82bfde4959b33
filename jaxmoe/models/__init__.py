"""Real models: layer shapes and routing presets (``presets``)."""

from jaxmoe.models.presets import PRESETS, ModelPreset, get_preset

__all__ = ["ModelPreset", "PRESETS", "get_preset"]
