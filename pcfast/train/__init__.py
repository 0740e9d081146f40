"""Training: configuration, presets, learning rules, the epoch loop with metrics and checkpoints."""

from pcfast.train.config import TrainConfig
from pcfast.train.loop import TrainingDiverged, evaluate, resolve_device, run_training
from pcfast.train.presets import PRESETS, preset_config, register_preset
from pcfast.train.rules import RULES, BPRule, PCRule, Rule, register_rule

__all__ = [
    "PRESETS", "RULES", "BPRule", "PCRule", "Rule", "TrainConfig", "TrainingDiverged",
    "evaluate", "preset_config", "register_preset", "register_rule", "resolve_device",
    "run_training",
]
