"""lorakit's operations: one request type and one function per operation, behind every door.

The HTTP API (:mod:`lib_lorakit.api`), the command line (:mod:`lib_lorakit.cli`) and the tabs
(:mod:`lib_lorakit.ui`) build a request, call the operation with a context
(:class:`HostContext` inside a host, :class:`LocalContext` on the command line) and show the
result; user errors are :class:`~lib_lorakit.errors.LorakitError` with an HTTP status on their
class. A new operation is one request type plus one function here, and a few lines per door.
"""

from . import bake, doctor, gen, grid, inspect, jobs, merge, models, tournament, triage
from .context import Context, HostContext, LocalContext
from .model import Request, RequestInvalid

__all__ = [
    "Context",
    "HostContext",
    "LocalContext",
    "Request",
    "RequestInvalid",
    "bake",
    "doctor",
    "gen",
    "grid",
    "inspect",
    "jobs",
    "merge",
    "models",
    "tournament",
    "triage",
]
