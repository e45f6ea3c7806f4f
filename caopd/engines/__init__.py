"""Rollout engines: sample K completions per prompt from the current student."""
from caopd.engines.base import RolloutEngine, SamplingParams, ScriptedEngine

__all__ = ["RolloutEngine", "SamplingParams", "ScriptedEngine"]
