"""The inspector's own header reader (inspect/header.py) against safetensors' loader, shared tensor tables,
bad files, and a scan that never imports torch."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types

import pytest
import torch
from factories import write
from safetensors import safe_open

from lib_lorakit import lazyimport
from lib_lorakit.errors import FormatError
from lib_lorakit.inspect import header as H
from lib_lorakit.inspect import inspect_paths
from lib_lorakit.inspect import structure as S
from lib_lorakit.synth import kohya_metadata, make_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reset():
    H._TABLES.clear()
    S._SKELETONS.clear()
    S._MATCHES.clear()
    for k in H.TABLE_STATS:
        H.TABLE_STATS[k] = 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_alpha_scalars_from_bytes_match_safetensors_loader(tmp_path, dtype):
    sd = make_lora("sd15", "lora", rank=2, tiny=True, te=False, conv=False, seed=3)
    keys = sorted(k for k in sd if k.endswith(".alpha"))
    g = torch.Generator().manual_seed(7)
    for i, k in enumerate(keys):  # awkward values: not round, negative, and shapes () and (1,)
        v = (torch.rand((), generator=g) * 200 - 100) if dtype.is_floating_point else torch.tensor(i * 37 - 50)
        sd[k] = v.to(dtype).reshape((1,) if i % 2 else ())
    path = write(tmp_path, "a.safetensors", sd)
    src = H.open_lora_header(path)
    got = src.read_scalars(keys)
    with safe_open(path, "pt") as f:  # safetensors' own loader and torch's conversion
        want = {k: float(f.get_tensor(k).reshape(-1)[0]) for k in keys}
    assert got == want
    assert len(set(want.values())) > 1


def test_table_and_metadata_match_safe_open_and_are_shared(tmp_path):
    _reset()
    sd = make_lora("sd15", "lora", rank=2, tiny=True, te=True, conv=False, seed=1)
    short = kohya_metadata("sd15", output_name="a", dim=2, alpha=1.0, folders={})
    long = kohya_metadata("sd15", output_name="b" * 37, dim=2, alpha=2.0, folders={"5_x": (10, [("x", 10)])})
    paths = [
        write(tmp_path, "a.safetensors", sd, short),
        write(tmp_path, "b.safetensors", sd, long),  # same table, metadata of another length (padding differs)
        write(tmp_path, "c.safetensors", sd),  # same table, no metadata
    ]
    for p in paths:
        src = H.open_lora_header(p)
        with safe_open(p, "np") as f:
            assert src.keys() == list(f.keys())  # sorted, as safetensors lists them
            assert src.metadata == (f.metadata() or {})
            for k in f.keys():
                sl = f.get_slice(k)
                assert src.shape(k) == tuple(sl.get_shape()) and src.dtype(k) == sl.get_dtype()
    assert H.TABLE_STATS == {"parsed": 1, "shared": 2}


def test_metadata_after_the_tensors_is_read_too(tmp_path):
    """A writer that puts __metadata__ last: the table is not shared, everything is still read right."""
    _reset()
    sd = make_lora("sd15", "lora", rank=2, tiny=True, te=False, conv=False, seed=2)
    meta = {"ss_network_dim": "2", "ss_network_alpha": "1.0", "ss_output_name": "late"}
    first = write(tmp_path, "first.safetensors", sd, meta)
    with open(first, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    head["__metadata__"] = head.pop("__metadata__")  # moved to the end
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    late = tmp_path / "late.safetensors"
    late.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    a, b = inspect_paths([first, str(late)], workers=1)
    assert b["training"]["fields"]["ss_output_name"] == "late" and b["structure"] == a["structure"]
    assert H.TABLE_STATS["parsed"] == 2


def test_bad_headers_are_named_errors(tmp_path):
    _reset()
    sd = make_lora("sd15", "lora", rank=2, tiny=True, te=False, conv=False, seed=4)
    good = write(tmp_path, "good.safetensors", sd, {"ss_output_name": "g"})
    data = open(good, "rb").read()
    H.open_lora_header(good)  # its table is now known: a damaged copy must not borrow it
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 16) + b"{not json at all")
    bad = bytearray(data)
    bad[8:24] = b'{"__metadata__":'
    meta_end = data.index(b"},", 8)
    bad[meta_end - 3 : meta_end] = b"123"  # the value "g" written as a number
    (tmp_path / "meta.safetensors").write_bytes(bytes(bad))
    for name, words in (
        ("cut", "truncated"),
        ("short", "8-byte header length"),
        ("junk", "not valid JSON"),
        ("meta", "strings to strings"),
    ):
        with pytest.raises(FormatError) as e:
            H.open_lora_header(str(tmp_path / f"{name}.safetensors"))
        assert f"{name}.safetensors" in str(e.value) and words in str(e.value), str(e.value)
    reps = inspect_paths([str(tmp_path)], workers=2)
    assert [("error" in r) for r in reps] == [True, False, True, True, True]


def test_shared_tables_give_each_file_its_own_alphas_and_findings(tmp_path, monkeypatch):
    """Three files with one table: alphas stated by the metadata (1 and 8) and read from the tensors (3)."""
    sd = make_lora("sd15", "lora", rank=4, alpha=3.0, tiny=True, te=True, conv=False, seed=5)
    folders = {"10_zkw girl": (20, [("zkw", 20), ("1girl", 18)])}
    paths = [
        write(tmp_path, "one.safetensors", sd, kohya_metadata("sd15", output_name="one", dim=4, alpha=1.0, folders={})),
        write(
            tmp_path,
            "zkw.safetensors",
            sd,
            kohya_metadata("sd15", output_name="zkw", dim=4, alpha=8.0, folders=folders),
        ),
        write(tmp_path, "three.safetensors", sd),
    ]
    _reset()
    shared = inspect_paths(paths, workers=1)
    assert H.TABLE_STATS == {"parsed": 1, "shared": 2}
    assert [r["alpha"] for r in shared] == [1.0, 8.0, 3.0]  # as written
    assert [r["structure"]["alpha_source"] for r in shared] == ["metadata", "metadata", "tensors"]
    assert [r["trigger"] for r in shared] == [None, "zkw", None]
    shared[0]["structure"]["blocks"]["IN01"] = -1  # reports do not share what they hold
    assert shared[1]["structure"]["blocks"].get("IN01") != -1
    monkeypatch.setenv(S.ENV_NO_REUSE, "1")  # every file read and planned afresh
    _reset()
    fresh = inspect_paths(paths, workers=1)
    assert H.TABLE_STATS["shared"] == 0
    del shared[0]["structure"]["blocks"]["IN01"], fresh[0]["structure"]["blocks"]["IN01"]
    assert json.dumps(shared, sort_keys=True) == json.dumps(fresh, sort_keys=True)


def test_metadata_alpha_reads_no_tensor(tmp_path, monkeypatch):
    sd = make_lora("sd15", "lora", rank=2, tiny=True, te=False, conv=False)
    p = write(tmp_path, "m.safetensors", sd, kohya_metadata("sd15", output_name="m", dim=2, alpha=1.0, folders={}))

    def no_reads(*a, **k):
        raise AssertionError("read a tensor although the metadata states the alphas")

    monkeypatch.setattr(H.LoraHeader, "read_scalars", no_reads)
    monkeypatch.setattr(H.LoraHeader, "read", no_reads)
    assert inspect_paths([p])[0]["structure"]["alpha_source"] == "metadata"


def test_cli_inspect_does_not_import_torch(tmp_path):
    sd = make_lora("sd15", "lora", rank=2, alpha=1.0, tiny=False, te=False, conv=False)
    p = write(tmp_path, "full.safetensors", sd)  # full width: matched against the real layout (no synth)
    code = (
        "import io, contextlib, json, sys\n"
        "from lib_lorakit.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    rc = main(['inspect', sys.argv[1], '--json', '-q'])\n"
        "from lib_lorakit.lazyimport import is_deferred\n"
        "print(json.dumps({'rc': rc, 'torch': not is_deferred('torch'), 'report': json.loads(out.getvalue())}))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-c", code, p], capture_output=True, text=True, env=env, timeout=120)
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["rc"] == 0 and got["torch"] is False, res.stderr[-2000:]
    here = inspect_paths([p])[0]  # this process has torch loaded
    assert json.dumps(got["report"], sort_keys=True) == json.dumps(here, sort_keys=True)
    assert got["report"]["structure"]["alpha_source"] == "tensors" and got["report"]["alpha"] == 1.0


def test_deferred_package_loads_once_on_first_use(tmp_path, monkeypatch):
    pkg = tmp_path / "lkdeferred"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import builtins\nbuiltins.lk_loads = getattr(builtins, 'lk_loads', 0) + 1\nX = 1\n"
    )
    (pkg / "sub.py").write_text("import lkdeferred\nY = lkdeferred.X + 1\n")
    (tmp_path / "lkbroken").mkdir()
    (tmp_path / "lkbroken" / "__init__.py").write_text("raise ImportError('lkbroken cannot load')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins

    try:
        assert lazyimport.defer("lkdeferred") and lazyimport.is_deferred("lkdeferred")
        import lkdeferred

        assert isinstance(lkdeferred, types.ModuleType) and getattr(builtins, "lk_loads", 0) == 0
        import lkdeferred.sub as sub  # a submodule: the package loads first, once

        assert builtins.lk_loads == 1 and sub.Y == 2 and not lazyimport.is_deferred("lkdeferred")
        assert lkdeferred.X == 1 and lkdeferred.sub is sub and sys.modules["lkdeferred"].sub is sub
        assert builtins.lk_loads == 1
        assert not lazyimport.defer("lkdeferred")  # loaded: nothing to defer
        assert lazyimport.defer("lkbroken")
        import lkbroken

        for _ in range(2):  # the failure surfaces at first use, and again at the next
            with pytest.raises(ImportError, match="cannot load"):
                lkbroken.anything  # noqa: B018
        assert lazyimport.is_deferred("lkbroken")
    finally:
        for name in ("lkdeferred", "lkdeferred.sub", "lkbroken"):
            sys.modules.pop(name, None)
        lazyimport._PENDING.pop("lkbroken", None)
        if not lazyimport._PENDING and lazyimport._FINDER in sys.meta_path:
            sys.meta_path.remove(lazyimport._FINDER)
        if hasattr(builtins, "lk_loads"):
            del builtins.lk_loads
