import json
import os
import struct

import pytest
import safetensors.torch
import torch
from factories import files_in

from lib_lorakit.errors import FormatError, OutputError
from lib_lorakit.formats.safetensors_io import OutEntry, SafetensorsFile, StreamingWriter, read_header, save_file


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 5, 3, 3, generator=g).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).reshape(1, 77),
        "first_stage_model.quant_conv.bias": torch.randn(8, generator=g),
        "logit_scale": torch.tensor(4.6, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "flag": torch.tensor([True, False]),
    }


def test_roundtrip_against_the_safetensors_library(tmp_path):
    t = sample()
    p = str(tmp_path / "a.safetensors")
    save_file(t, p, {"modelspec.title": "x"})
    theirs = safetensors.torch.load_file(p)  # an independent reader
    assert theirs.keys() == t.keys()
    for k in t:
        assert theirs[k].dtype == t[k].dtype and torch.equal(theirs[k], t[k])
    with SafetensorsFile(p) as f:
        assert f.metadata == {"modelspec.title": "x"}
        for k in t:
            assert torch.equal(f.read(k), t[k])
    # and our reader reads the library's files
    q = str(tmp_path / "b.safetensors")
    safetensors.torch.save_file(t, q, metadata={"a": "b"})
    with SafetensorsFile(q) as f:
        assert all(torch.equal(f.read(k), t[k]) for k in t)


def test_read_into_reused_buffer(tmp_path):
    p = str(tmp_path / "a.safetensors")
    save_file(sample(), p)
    buf = torch.empty(1 << 12, dtype=torch.uint8)
    with SafetensorsFile(p) as f:
        a = f.read("model.diffusion_model.out.2.weight", out=buf)
        assert a.data_ptr() == buf.data_ptr()
        assert torch.equal(a, sample()["model.diffusion_model.out.2.weight"])


def _file(tmp_path, header: dict | bytes, data: bytes, length: int | None = None) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = str(tmp_path / "bad.safetensors")
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return p


@pytest.mark.parametrize(
    "case,match",
    [
        ("short", "only 3 bytes"),
        ("zero_len", "header length 0 is not sane"),
        ("huge_len", "not sane"),
        ("len_past_end", "runs past the end of the file"),
        ("bad_json", "not valid JSON"),
        ("not_object", "not a JSON object"),
        ("bad_dtype", "unknown dtype 'F17'"),
        ("bad_shape", "invalid shape"),
        ("size_mismatch", r"needs 24 bytes but its span holds 20"),
        ("truncated", "truncated"),
        ("overlap", "overlap"),
        ("bad_metadata", "__metadata__ must map strings to strings"),
    ],
)
def test_header_validation(tmp_path, case, match):
    ok = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    if case == "short":
        p = str(tmp_path / "bad.safetensors")
        open(p, "wb").write(b"abc")
    elif case == "zero_len":
        p = _file(tmp_path, b"", b"", length=0)
    elif case == "huge_len":
        p = _file(tmp_path, ok, b"\0" * 24, length=1 << 40)
    elif case == "len_past_end":
        p = _file(tmp_path, ok, b"", length=10_000)
    elif case == "bad_json":
        p = _file(tmp_path, b"{not json", b"")
    elif case == "not_object":
        p = _file(tmp_path, b"[1, 2]", b"")
    elif case == "bad_dtype":
        p = _file(tmp_path, {"a": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "bad_shape":
        p = _file(tmp_path, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "size_mismatch":
        p = _file(tmp_path, {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, b"\0" * 24)
    elif case == "truncated":
        p = _file(tmp_path, ok, b"\0" * 10)
    elif case == "overlap":
        p = _file(
            tmp_path,
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        )
    else:
        p = _file(tmp_path, {"__metadata__": {"a": 1}, **ok}, b"\0" * 24)
    with pytest.raises(FormatError, match=match) as e:
        read_header(p)
    assert p in str(e.value)  # the message names the file


def test_truncated_real_file_is_caught_before_reading(tmp_path):
    p = str(tmp_path / "a.safetensors")
    save_file(sample(), p)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 7)
    with pytest.raises(FormatError, match="truncated"):
        SafetensorsFile(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FormatError, match="file not found"):
        read_header(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FormatError, match="is a folder"):
        read_header(str(tmp_path))


def test_writer_refuses_existing_output_unless_overwrite(tmp_path):
    p = str(tmp_path / "a.safetensors")
    save_file(sample(), p)
    before = open(p, "rb").read()
    with pytest.raises(OutputError, match="already exists"):
        save_file({"x": torch.zeros(2)}, p)
    assert open(p, "rb").read() == before
    save_file({"x": torch.zeros(2)}, p, overwrite=True)
    assert safetensors.torch.load_file(p).keys() == {"x"}
    assert files_in(tmp_path) == ["a.safetensors"]


def test_writer_leaves_nothing_on_error(tmp_path):
    p = str(tmp_path / "out.safetensors")
    entries = [OutEntry("a", "F32", (4,)), OutEntry("b", "F32", (4,))]
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingWriter(p, entries) as w:
            w.write("a", torch.zeros(4))
            assert len(files_in(tmp_path)) == 1 and files_in(tmp_path)[0].endswith(".lorakit-tmp")
            raise RuntimeError("boom")
    assert files_in(tmp_path) == []


def test_writer_leaves_nothing_on_keyboard_interrupt(tmp_path):
    p = str(tmp_path / "out.safetensors")
    with pytest.raises(KeyboardInterrupt):
        with StreamingWriter(p, [OutEntry("a", "F32", (4,))]):
            raise KeyboardInterrupt
    assert files_in(tmp_path) == []


def test_writer_checks_order_size_dtype_and_completeness(tmp_path):
    p = str(tmp_path / "out.safetensors")
    entries = [OutEntry("a", "F32", (4,)), OutEntry("b", "F16", (2,))]
    with StreamingWriter(p, entries) as w:
        with pytest.raises(ValueError, match="order broken"):
            w.write("b", torch.zeros(2, dtype=torch.float16))
        with pytest.raises(ValueError, match="bytes given"):
            w.write("a", torch.zeros(3))
        w.write("a", torch.zeros(4))
        with pytest.raises(ValueError, match="dtype"):
            w.write("b", torch.zeros(1))  # 4 bytes, as declared, but float32 instead of float16
        with pytest.raises(ValueError, match="before all tensors"):
            w.commit()
    assert files_in(tmp_path) == []


def test_copy_range_and_patch_metadata(tmp_path):
    src = str(tmp_path / "src.safetensors")
    t = sample()
    save_file(t, src)
    out = str(tmp_path / "out.safetensors")
    with SafetensorsFile(src) as f:
        keys = f.keys()
        entries = [OutEntry(k, f.info(k).dtype, f.info(k).shape) for k in keys]
        with StreamingWriter(out, entries, {"sha": "0" * 8}) as w:
            for k in keys:
                info = f.info(k)
                w.copy_range(k, f.fd, info.start, info.nbytes)
            w.patch_metadata({"sha": "abcdef12"})
            with pytest.raises(ValueError, match="header length"):
                w.patch_metadata({"sha": "longer-than-before"})
            w.commit()
    back = safetensors.torch.load_file(out)
    assert all(torch.equal(back[k], t[k]) for k in t)
    with SafetensorsFile(out) as f:
        assert f.metadata == {"sha": "abcdef12"}


def test_portable_paths_without_preadv_copy_file_range_or_o_direct(tmp_path, monkeypatch):
    """What Windows and macOS run: seek+read under a lock, plain copies, buffered writes."""
    import lib_lorakit.formats.safetensors_io as sio

    src = str(tmp_path / "src.safetensors")
    t = sample()
    save_file(t, src)
    monkeypatch.delattr(os, "preadv")
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    out = str(tmp_path / "out.safetensors")
    with SafetensorsFile(src) as f:
        assert all(torch.equal(f.read(k), t[k]) for k in t)
        keys = f.keys()
        with StreamingWriter(out, [OutEntry(k, f.info(k).dtype, f.info(k).shape) for k in keys]) as w:
            assert not w.direct_io
            for k in keys:
                w.copy_range(k, f.fd, f.info(k).start, f.info(k).nbytes)
            w.commit()
    back = safetensors.torch.load_file(out)
    assert all(torch.equal(back[k], t[k]) for k in t)
    _ = sio


def test_direct_io_writer_handles_large_and_unaligned_files(tmp_path):
    """Tensors spanning several staging buffers, and a tail that is not block-aligned."""
    g = torch.Generator().manual_seed(1)
    t = {"big": torch.randn(3 * 1024 * 1024 + 7, generator=g), "tail": torch.randn(13, generator=g).half()}
    p = str(tmp_path / "big.safetensors")
    save_file(t, p)
    back = safetensors.torch.load_file(p)
    assert torch.equal(back["big"], t["big"]) and torch.equal(back["tail"], t["tail"])
    assert os.path.getsize(p) % 4096 != 0  # the padding of the last direct block was trimmed


def _pwrite_failing(monkeypatch, err: int, after: int):
    """os.pwrite raising ``err`` from its ``after``-th call on (the writer threads' calls)."""
    import errno as _errno

    real, calls = os.pwrite, []

    def pwrite(fd, data, off):
        calls.append(off)
        if len(calls) > after:
            raise OSError(err, _errno.errorcode.get(err, "error"))
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return calls


def test_direct_io_refused_at_write_time_goes_on_buffered(tmp_path, monkeypatch):
    """A filesystem that accepts O_DIRECT at open but refuses the writes (EINVAL): the same bytes land
    through a buffered descriptor, stages written by several threads at their own offsets."""
    import errno

    from lib_lorakit.formats import safetensors_io as sio

    real = os.pwrite
    refused = []

    def pwrite(fd, data, off):
        if _is_direct(fd):
            refused.append(off)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, off)

    def _is_direct(fd):
        import fcntl

        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here")
    monkeypatch.setattr(os, "pwrite", pwrite)
    g = torch.Generator().manual_seed(2)
    t = {f"w{i}": torch.randn(1024 * 1024 + i, generator=g) for i in range(5)}  # ~20 MB: several stages
    p = str(tmp_path / "fallback.safetensors")
    with sio.StreamingWriter(p, [sio.OutEntry(k, "F32", list(v.shape)) for k, v in t.items()]) as w:
        for k, v in t.items():
            w.write(k, v)
        w.commit()
    monkeypatch.undo()
    assert refused, "no write was refused: the fallback was not exercised"
    back = safetensors.torch.load_file(p)
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_a_write_error_in_a_writer_thread_reaches_the_caller_and_leaves_no_file(tmp_path, monkeypatch):
    """Disk full while a stage is being written in the background: the caller gets the error (in words,
    naming the output), and neither the output nor its temporary file is left."""
    import errno

    from lib_lorakit.formats import safetensors_io as sio

    calls = _pwrite_failing(monkeypatch, errno.ENOSPC, after=1)
    t = {f"w{i}": torch.zeros(1024 * 1024) for i in range(6)}
    p = str(tmp_path / "full.safetensors")
    with pytest.raises(OutputError) as e:
        with sio.StreamingWriter(p, [sio.OutEntry(k, "F32", list(v.shape)) for k, v in t.items()]) as w:
            for k, v in t.items():
                w.write(k, v)
            w.commit()
    monkeypatch.undo()
    assert len(calls) >= 2
    assert "full.safetensors" in str(e.value) and "space" in str(e.value).lower(), e.value
    assert os.listdir(tmp_path) == []
