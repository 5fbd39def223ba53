"""LN tuning (trained copies of normalisation layers) for grafting."""

from grafting_ln_tuning.config import LNTuningConfig
from grafting_ln_tuning.layers import LNTuningAdapter

__all__ = ["LNTuningAdapter", "LNTuningConfig"]
