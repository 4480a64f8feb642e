"""Checkpoint merging: methods (one tensor at a time) and the streaming engine."""

from .engine import METHODS, ModelSpec, merge, parse_model_arg, plan_merge, summary

__all__ = ["METHODS", "ModelSpec", "merge", "parse_model_arg", "plan_merge", "summary"]
