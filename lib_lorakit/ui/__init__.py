"""Gradio builders (gradio 3.41 in A1111 1.10, 4.x in Forge). They take plain callables and services."""

from .app import build_ui

__all__ = ["build_ui"]
