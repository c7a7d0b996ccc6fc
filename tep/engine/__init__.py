"""Continuous batching: many sequences per model step, one sampling call per step."""
from tep.engine.model import Model, StepBatch

__all__ = ["Model", "StepBatch"]
