"""The model: :class:`GPTConfig`, named presets, the record-stack :class:`GPT`, and checkpoint conversion."""

from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.model.presets import PRESETS, Preset, get_preset

__all__ = ["GPT", "GPTConfig", "PRESETS", "Preset", "get_preset"]
