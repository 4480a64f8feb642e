"""The request base type: pydantic 1 and 2 behind one shim, unknown fields refused, bounds enforced.

Every operation has one request type (a subclass of :class:`Request`). The HTTP API takes
it as the body, the CLI and the tabs build it; :meth:`Request.parse` is the single place
where raw input becomes a request, and a bad field becomes a :class:`RequestInvalid` that
names the field and the value (HTTP 400, CLI exit 2) — never pydantic's own text.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, TypeVar

import pydantic
from pydantic import BaseModel, Field

from ..errors import LorakitError

PYDANTIC_V2 = int(pydantic.VERSION.split(".")[0]) >= 2

__all__ = ["Field", "Request", "RequestInvalid", "dump", "PYDANTIC_V2"]

R = TypeVar("R", bound="Request")


class RequestInvalid(LorakitError):
    """A request field is missing, unknown, of the wrong type or out of range."""

    http_status = 400


def _loc(loc: Any) -> str:
    parts = [str(p) for p in (loc or ()) if p not in ("body", "__root__")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "request"


def _describe(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"  # 50 and 50.0 read the same whichever door sent them
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def explain(errors: list[dict[str, Any]], data: Any = None) -> str:
    """pydantic's error list as one sentence per field: which field, what was given, what is allowed."""
    lines = []
    for e in errors[:5]:
        field = _loc(e.get("loc"))
        typ = str(e.get("type", ""))
        msg = str(e.get("msg", "invalid"))
        if "input" in e:
            given = e["input"]
        else:
            given = _lookup(data, e.get("loc"))
        if typ in ("extra_forbidden", "value_error.extra"):
            lines.append(f"{field}: unknown field.")
        elif typ in ("missing", "value_error.missing"):
            lines.append(f"{field}: required.")
        else:
            shown = "" if given is _MISSING else f" (got {_describe(given)})"
            lines.append(f"{field}: {msg[0].lower() + msg[1:] if msg else 'invalid'}{shown}.")
    if len(errors) > 5:
        lines.append(f"... and {len(errors) - 5} more.")
    return " ".join(lines)


_MISSING = object()


def _lookup(data: Any, loc: Any) -> Any:
    cur = data
    for p in loc or ():
        if p in ("body", "__root__"):
            continue
        try:
            cur = cur[p]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return cur


class Request(BaseModel):
    """Base of every request type: unknown fields are refused; floats must be finite and in bounds."""

    if PYDANTIC_V2:
        model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
    else:  # pragma: no cover - exercised in the gradio 3 / pydantic 1 environment

        class Config:
            extra = "forbid"

        @pydantic.root_validator(pre=False, skip_on_failure=True)
        def _finite(cls, values):  # pydantic 1 lets nan/inf through float fields without bounds
            for k, v in values.items():
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{k}: {v!r} is not a finite number")
            return values

    # list field -> the most items it may hold; checked before anything else, so an oversized request is
    # refused at once (a 20,000-entry recipe never reaches the queue)
    LIMITS: ClassVar[Dict[str, int]] = {}

    @classmethod
    def check_limits(cls, data: Any, what: str | None = None) -> None:
        for name, most in cls.LIMITS.items():
            v = data.get(name) if isinstance(data, dict) else getattr(data, name, None)
            if isinstance(v, (list, tuple)) and len(v) > most:
                raise RequestInvalid(
                    f"{what or _title(cls)}: {name}: {len(v)} items; at most {most} are accepted.",
                    fix=f"Split the work into requests of at most {most} {name}.",
                )

    @classmethod
    def parse(cls: type[R], data: Any, what: str | None = None) -> R:
        """Validate ``data`` (a mapping) into this request, or raise :class:`RequestInvalid`."""
        if isinstance(data, cls):
            cls.check_limits(data, what)
            return data
        if not isinstance(data, dict):
            raise RequestInvalid(f"{what or cls.__name__}: expected an object with fields, got {type(data).__name__}.")
        cls.check_limits(data, what)
        try:
            return cls.model_validate(data) if PYDANTIC_V2 else cls.parse_obj(data)
        except pydantic.ValidationError as e:
            raise RequestInvalid(f"{what or _title(cls)}: {explain(e.errors(), data)}", fix=cls.fix_hint()) from None

    @classmethod
    def fix_hint(cls) -> str | None:
        return None

    def dump(self) -> dict[str, Any]:
        return dump(self)

    def copy_with(self: R, **changes: Any) -> R:
        return type(self).parse({**self.dump(), **changes})


def _title(cls: type) -> str:
    name = cls.__name__
    return name[:-7].lower() + " request" if name.endswith("Request") else name


def dump(m: BaseModel) -> dict[str, Any]:
    """A model as a plain dict (pydantic 1 or 2)."""
    return m.model_dump() if PYDANTIC_V2 else m.dict()


def validation_errors_to_invalid(errors: list[dict[str, Any]], body: Any = None, model: Any = None) -> RequestInvalid:
    """FastAPI's request-validation errors as the documented lorakit error (worded as :meth:`Request.parse`'s)."""
    errors = list(errors)
    bad_json = [e for e in errors if str(e.get("type", "")) in ("json_invalid", "value_error.jsondecode")]
    if bad_json:  # pydantic 2 / FastAPI 0.94 (pydantic 1) name for a body that is not JSON
        e = bad_json[0]
        at = next((x for x in (e.get("loc") or ())[1:] if isinstance(x, int)), None)
        where = f" at character {at}" if at is not None else ""
        detail = (e.get("ctx") or {}).get("error") or e.get("msg") or ""
        return RequestInvalid(
            f"The request body is not valid JSON{where} ({detail}).",
            fix="Send a JSON object (check quotes, commas and brackets; NaN and Infinity are not numbers in JSON).",
        )
    if isinstance(model, type) and issubclass(model, Request):
        roots = [e for e in errors if _loc(e.get("loc")) == "request" and str(e.get("type", "")) in _NOT_AN_OBJECT]
        if roots:
            got = roots[0].get("input", body)
            return RequestInvalid(f"{_title(model)}: expected an object with fields, got {type(got).__name__}.")
        return RequestInvalid(f"{_title(model)}: {explain(errors, body)}", fix=model.fix_hint())
    return RequestInvalid(f"request: {explain(errors, body)}")


_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type", "type_error.dict", "dict_attributes_type")
