"""Evaluation logic: image diagnostics and verdicts (tournament scoring and triage to come)."""
