"""Generation backends: who makes the images.

Two real implementations share one small interface:

- :class:`HostBackend`: in-process, through the WebUI host adapter (``lib_lorakit/host``);
- :class:`HttpBackend`: a running WebUI's HTTP API (``/sdapi/v1/...``), for automation from
  outside (``python -m lib_lorakit autotest --webui URL``), with ``--api-auth`` credentials.

A backend lists the host's checkpoints and LoRAs *after refreshing them* (a file copied in
after start-up is found), and makes one image per request. ``request`` keys: prompt,
negative_prompt, seed, steps, cfg_scale, width, height, sampler_name, scheduler, checkpoint
(a name from :meth:`checkpoints`; the host's own checkpoint is restored afterwards).
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from ..errors import LorakitError


class GenError(LorakitError):
    """Generation failed or the generating WebUI cannot be used."""


class GenerationUnavailable(GenError):
    """This host cannot make images (the standalone launcher): HTTP 501."""

    http_status = 501


class UnknownModel(GenError):
    """A checkpoint or LoRA name the generating host does not list (HTTP 404)."""

    http_status = 404


@dataclass(frozen=True)
class ModelInfo:
    """A checkpoint or LoRA as the generating host knows it."""

    name: str  # what goes into a request: the checkpoint title, or the LoRA's tag name
    path: str  # the file, as the host reports it
    hash: str = ""  # a short content hash (see quick_hash), "" when unknown
    aliases: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        base = os.path.basename(self.path)
        return (self.name, *self.aliases, base, os.path.splitext(base)[0])


@dataclass
class GenImage:
    image: Image.Image
    infotext: str
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    kind: str  # "host" or "http"

    def refresh(self) -> None: ...
    def checkpoints(self) -> list[ModelInfo]: ...
    def loras(self) -> list[ModelInfo]: ...
    def current_checkpoint(self) -> str | None: ...
    def txt2img(self, request: dict[str, Any]) -> GenImage: ...


# --- batches --------------------------------------------------------------------------------------
# A batch is a list of requests equal in everything but the seed, whose seeds run consecutively
# (seed, seed+1, ...): that is how the WebUI's /sdapi/v1/txt2img numbers the images of one
# ``batch_size`` request (``all_seeds``), and each image's infotext reports its own seed.


def same_but_seed(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "seed"} == {k: v for k, v in b.items() if k != "seed"}


def batchable(requests: list[dict[str, Any]]) -> bool:
    """Whether ``requests`` can go as one ``batch_size`` request (same settings, consecutive seeds)."""
    first = requests[0]
    return (
        all(
            same_but_seed(first, r) and int(r.get("seed", -1)) == int(first.get("seed", -1)) + i
            for i, r in enumerate(requests)
        )
        and int(first.get("seed", -1)) >= 0
    )


def txt2img_batch(backend: Any, requests: list[dict[str, Any]]) -> list[GenImage]:
    """The images of ``requests``, in order: one batched request where the backend supports it and the
    requests form a batch, else one request each. A backend without batching works unchanged."""
    if len(requests) > 1 and hasattr(backend, "txt2img_batch") and batchable(requests):
        return backend.txt2img_batch(requests)
    return [backend.txt2img(r) for r in requests]


_HASHES: dict[tuple[str, int, int], str] = {}


def quick_hash(path: str) -> str:
    """A cheap content hash: SHA-256 of the first header bytes, 64 KiB from the middle and the file
    size, 12 hex digits. It tells two files apart (a retrained epoch, a re-saved merge) without reading
    gigabytes; it is not the WebUI's full SHA-256. "" when the file cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    h = hashlib.sha256(str(st.st_size).encode())
    try:
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if st.st_size > 2 << 20:
                f.seek(st.st_size // 2)
                h.update(f.read(1 << 16))
    except OSError:
        return ""
    _HASHES[key] = h.hexdigest()[:12]
    return _HASHES[key]


def resolve_name(value: str, entries: list[ModelInfo], what: str) -> ModelInfo:
    """The entry ``value`` names (its request name, an alias, the file name with or without extension,
    or the full path). Unknown names are refused with the nearest matches."""
    v = value.strip()
    for e in entries:
        if v == e.path or (os.path.isabs(v) and os.path.realpath(v) == os.path.realpath(e.path)):
            return e
    for e in entries:
        if v in e.names():
            return e
    low = v.lower()
    hits = [e for e in entries if low in (n.lower() for n in e.names())]
    if len(hits) == 1:
        return hits[0]
    pool = sorted({n for e in entries for n in e.names()[:2]})
    near = difflib.get_close_matches(v, pool, n=5, cutoff=0.4)
    hint = f"Nearest: {', '.join(near)}." if near else f"The host lists {len(entries)} {what}s."
    raise UnknownModel(
        f"Unknown {what} {value!r}: the generating WebUI does not list it (after refreshing its list).",
        fix=f"{hint} Copy the file into the WebUI's {what} folder or fix the name.",
    )


def lora_tag_name(path: str) -> str:
    """The name the WebUI's ``<lora:NAME:w>`` syntax finds a file by: its file name without extension."""
    return os.path.splitext(os.path.basename(path))[0]


# --- in-process ---------------------------------------------------------------------------------


class HostBackend:
    """Generates through a :class:`~lib_lorakit.hosts.Host` (the WebUI adapter, in-process)."""

    kind = "host"

    def __init__(self, host):
        self.host = host

    def refresh(self) -> None:
        self.host.refresh_checkpoints()
        self.host.refresh_loras()

    def checkpoints(self) -> list[ModelInfo]:
        return [ModelInfo(e.name, e.path, quick_hash(e.path), tuple(e.aliases)) for e in self.host.list_checkpoints()]

    def loras(self) -> list[ModelInfo]:
        return [
            ModelInfo(lora_tag_name(e.path), e.path, quick_hash(e.path), (e.name, *e.aliases))
            for e in self.host.list_loras()
        ]

    def current_checkpoint(self) -> str | None:
        return self.host.current_checkpoint()

    def engine(self) -> str:
        return str(getattr(self.host, "flavour", "a1111"))

    def interrupt(self) -> None:
        stop = getattr(self.host, "interrupt", None)
        if stop:
            stop()

    def cmd_flags(self) -> dict[str, Any]:
        """The WebUI's command-line flags ({} when the host has none to show)."""
        get = getattr(self.host, "cmd_flags", None)
        return dict(get() or {}) if get else {}

    def txt2img(self, request: dict[str, Any]) -> GenImage:
        res = self.host.txt2img(request)
        images = res.get("images") or []
        if not images:
            raise GenError("The WebUI returned no image.", fix="See the WebUI console for the error.")
        infos = res.get("infotexts") or [""]
        return GenImage(images[0], infos[0] if infos else "", int(res.get("seed", request.get("seed", -1))))

    def txt2img_batch(self, requests: list[dict[str, Any]]) -> list[GenImage]:
        """One request for the batch (the host's processing takes a list of seeds); see :func:`batchable`."""
        seeds = [int(r["seed"]) for r in requests]
        res = self.host.txt2img({**requests[0], "seed": seeds[0], "batch_size": len(seeds)})
        images = list(res.get("images") or [])
        infos = list(res.get("infotexts") or [])
        first = len(images) - len(seeds)  # a grid, when the host adds one, comes first
        if first < 0:
            raise GenError(f"The WebUI returned {len(images)} image(s) for a batch of {len(seeds)}.")
        infos = infos[first:] if len(infos) == len(images) else infos
        all_seeds = list(res.get("all_seeds") or seeds)
        return [
            GenImage(images[first + i], infos[i] if i < len(infos) else "", int(all_seeds[i]))
            for i in range(len(seeds))
        ]


# --- over HTTP ----------------------------------------------------------------------------------


class HttpBackend:
    """A running WebUI's API (``--api``): /sdapi/v1/txt2img with a per-request checkpoint override
    (restored afterwards), refresh-checkpoints / refresh-loras, sd-models, loras, options."""

    kind = "http"

    def __init__(self, url: str, auth: str | None = None, timeout: float = 3600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json"}
        if auth:
            if ":" not in auth:
                raise GenError("--api-auth must be USER:PASSWORD.")
            self._headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()

    def _open(self, method: str, route: str, body: Any = None, timeout: float | None = None) -> bytes:
        """The raw answer to one request (urllib's errors pass through)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + route, data=data, method=method, headers=self._headers)
        with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
            return r.read()

    def _call(self, method: str, route: str, body: Any = None, timeout: float | None = None) -> Any:
        try:
            raw = self._open(method, route, body, timeout)
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode("utf-8", "replace")
            if e.code == 401:
                raise GenError(f"{self.url}{route}: 401 unauthorised.", fix="Pass --api-auth USER:PASSWORD.") from None
            if e.code == 404 and route.startswith("/sdapi"):
                raise GenError(f"{self.url}{route}: 404.", fix="Start the WebUI with --api.") from None
            raise GenError(f"{self.url}{route}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise GenError(
                f"Cannot reach the WebUI at {self.url} ({e}).", fix="Check the URL and that the WebUI runs with --api."
            ) from None
        return json.loads(raw) if raw else None

    def refresh(self) -> None:
        self._call("POST", "/sdapi/v1/refresh-checkpoints", {})
        self._call("POST", "/sdapi/v1/refresh-loras", {})

    def checkpoints(self) -> list[ModelInfo]:
        out = []
        for m in self._call("GET", "/sdapi/v1/sd-models") or []:
            path = m.get("filename") or ""
            h = (m.get("sha256") or "")[:12] or quick_hash(path) or (m.get("hash") or "")
            out.append(ModelInfo(m["title"], path, h, tuple(x for x in (m.get("model_name"),) if x)))
        return out

    def loras(self) -> list[ModelInfo]:
        out = []
        for m in self._call("GET", "/sdapi/v1/loras") or []:
            path = m.get("path") or ""
            name = m.get("name") or lora_tag_name(path)
            alias = m.get("alias")
            out.append(ModelInfo(name, path, quick_hash(path), tuple(x for x in (alias,) if x and x != name)))
        return out

    def current_checkpoint(self) -> str | None:
        opts = self._call("GET", "/sdapi/v1/options") or {}
        return opts.get("sd_model_checkpoint")

    def engine(self) -> str:
        """ "forge" or "a1111" (Forge's settings have ``forge_*`` keys)."""
        opts = self._call("GET", "/sdapi/v1/options") or {}
        return "forge" if any(str(k).startswith("forge_") for k in opts) else "a1111"

    def cmd_flags(self) -> dict[str, Any]:
        """The WebUI's command-line flags (/sdapi/v1/cmd-flags); {} when it does not say. Forge answers
        them inside a response-validation error (HTTP 500 with the flags in ``body``)."""
        try:
            data = json.loads(self._open("GET", "/sdapi/v1/cmd-flags", timeout=30) or b"null")
        except urllib.error.HTTPError as e:
            try:
                data = json.loads(e.read() or b"null")
            except ValueError:
                return {}
            data = data.get("body") if isinstance(data, dict) else None
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def samplers(self) -> list[str]:
        """The sampler names its txt2img takes (names and aliases)."""
        out = []
        for x in self._call("GET", "/sdapi/v1/samplers") or []:
            out += [x.get("name") or "", *(x.get("aliases") or [])]
        return [n for n in out if n]

    def ping(self, timeout: float = 15.0) -> None:
        """Raise :class:`GenError` unless the WebUI answers (a short timeout; while it generates, the
        WebUI still answers this)."""
        self._call("GET", "/sdapi/v1/progress?skip_current_image=true", timeout=timeout)

    def interrupt(self) -> None:
        """Stop the image the WebUI is making now (its Interrupt button)."""
        self._call("POST", "/sdapi/v1/interrupt", {}, timeout=15.0)

    def txt2img(self, request: dict[str, Any]) -> GenImage:
        return self._post(request)[0]

    def _post(self, request: dict[str, Any]) -> list[GenImage]:
        body = {
            k: request[k]
            for k in (
                "prompt",
                "negative_prompt",
                "seed",
                "steps",
                "cfg_scale",
                "width",
                "height",
                "sampler_name",
                "scheduler",
            )
            if request.get(k) not in (None, "")
        }
        body.update(batch_size=int(request.get("batch_size") or 1), n_iter=1, send_images=True, save_images=False)
        override: dict[str, Any] = {}
        if request.get("checkpoint"):
            override["sd_model_checkpoint"] = request["checkpoint"]
        if request.get("clip_skip"):
            override["CLIP_stop_at_last_layers"] = int(request["clip_skip"])
        if override:
            body["override_settings"] = override
            body["override_settings_restore_afterwards"] = True
        res = self._call("POST", "/sdapi/v1/txt2img", body)
        images = (res or {}).get("images") or []
        if not images:
            raise GenError("The WebUI returned no image.", fix="See the WebUI console for the error.")
        info: dict[str, Any] = {}
        try:
            info = json.loads(res.get("info") or "{}")
        except (TypeError, ValueError):
            pass
        n = body["batch_size"]
        first = int(info.get("index_of_first_image") or 0)  # a grid, when the WebUI returns one, comes first
        if len(images) - first < n:
            raise GenError(f"{self.url}: the WebUI returned {len(images) - first} image(s) for a batch of {n}.")
        infos = list(info.get("infotexts") or [])
        infos = infos[first:] if len(infos) == len(images) else infos
        seeds = info.get("all_seeds") or [int(info.get("seed", request.get("seed", -1))) + i for i in range(n)]
        out = []
        for i in range(n):
            img = Image.open(io.BytesIO(base64.b64decode(images[first + i].split(",", 1)[-1])))
            img.load()
            out.append(GenImage(img, infos[i] if i < len(infos) else "", int(seeds[i])))
        return out

    def txt2img_batch(self, requests: list[dict[str, Any]]) -> list[GenImage]:
        """One ``batch_size`` request for a batch (see :func:`batchable`): seeds seed, seed+1, ... as the
        WebUI assigns them; each image comes with its own infotext and seed."""
        return self._post({**requests[0], "batch_size": len(requests)})
