"""The bake doctor: prove a baked checkpoint renders like its runtime recipe, and name the cause when it
does not (:mod:`.parity` measures and verdicts, :mod:`.variants` the controlled variant bakes,
:mod:`.diagnose` the runs and the causes, :mod:`.report` contact sheets and the summary)."""

from .diagnose import Check, diagnose, parity
from .parity import VERDICTS, RecipeLora, compare_sets, verdict
from .report import summary

__all__ = ["Check", "RecipeLora", "VERDICTS", "compare_sets", "diagnose", "parity", "summary", "verdict"]
