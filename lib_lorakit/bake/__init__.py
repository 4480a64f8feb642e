"""Bake a LoRA recipe into a checkpoint: exact, streaming, loud on mismatch.

- :mod:`.plan`: parse the recipe, open and check the inputs, decide where every module goes;
- :mod:`.engine`: stream the output (float32 maths, one rounding per weight);
- :mod:`.report`: the report, its summary and the recipe metadata written into the output.
"""

from ..errors import LorakitError
from ..formats.dtypes import SAVE_DTYPES
from .engine import bake
from .plan import Contribution, LoraSpec, LoraState, Plan, check_lora_values, parse_lora_arg, plan_bake
from .report import scale_lines, summary

__all__ = [
    "LoraSpec",
    "bake",
    "plan_bake",
    "parse_lora_arg",
    "summary",
    "SAVE_DTYPES",
    "LorakitError",
    "Contribution",
    "LoraState",
    "Plan",
    "check_lora_values",
    "scale_lines",
]
