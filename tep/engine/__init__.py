"""Continuous batching: many sequences per model step, one sampling call per step.

A model author writes a :class:`Model` (one batched ``forward`` over a :class:`StepBatch`
plus ``release``); :class:`EngineBackend` turns it into a :class:`tep.Backend` that
schedules, samples, streams and cancels. :class:`BatchedEmbeddings` adds cross-request
embedding batching to any backend.
"""
from tep.engine.backend import EngineBackend
from tep.engine.embed_batcher import BatchedEmbeddings, EmbedBatcher
from tep.engine.engine import Engine, EngineStats
from tep.engine.model import Model, StepBatch

__all__ = ["Model", "StepBatch", "EngineBackend", "Engine", "EngineStats",
           "BatchedEmbeddings", "EmbedBatcher"]
