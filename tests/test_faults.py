"""Crash debris: a real ``kill -9`` mid-write leaves a temp file tagged with its owner; the next lorakit write into
that folder removes it and says so — and never touches a live process's temp file or anybody else's file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from factories import tiny_checkpoint, write

from lib_lorakit import tempfiles
from lib_lorakit.synth import make_lora, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "lib_lorakit", *args],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **kw,
    )


def _temps(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(tempfiles.SUFFIX)]


def _written(out_dir) -> int:
    try:
        return max((os.path.getsize(os.path.join(out_dir, n)) for n in _temps(out_dir)), default=0)
    except OSError:
        return 0


def _kill_mid_write(argv, out_dir) -> str:
    """Start ``argv``, SIGKILL it once its temp file holds 1 MB; returns the orphan's name."""
    for _ in range(4):
        p = _cli(*argv)
        deadline = time.time() + 120
        while time.time() < deadline and _written(out_dir) < 1_000_000 and p.poll() is None:
            time.sleep(0.002)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.communicate(timeout=60)
            assert p.returncode == -signal.SIGKILL
            left = _temps(out_dir)
            if left:
                return left[0]
        else:
            p.communicate()
        for n in os.listdir(out_dir):  # it finished first: try again
            os.unlink(os.path.join(out_dir, n))
    pytest.fail("the write always finished before it could be killed")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    base = str(d / "base.safetensors")
    write_checkpoint(base, "sdxl", tiny=8, seed=1)  # ~70 MB in fp32: long enough to kill mid-write
    lora = write(d, "l.safetensors", make_lora("sdxl", "lora", tiny=8, conv=True, rank=4))
    small = tiny_checkpoint(d, "sdxl", name="small.safetensors")
    small_lora = write(d, "s.safetensors", make_lora("sdxl", "lora", conv=False))
    return d, base, lora, small, small_lora


@pytest.mark.slow
@pytest.mark.parametrize("what", ["bake", "merge"])
def test_kill_9_mid_write_then_next_run_removes_the_orphan(big, tmp_path, what):
    d, base, lora, small, small_lora = big
    out = tmp_path / "out"
    out.mkdir()
    if what == "bake":
        argv = ["bake", base, "--lora", lora, "-o", str(out / "o.safetensors"), "--save-dtype", "fp32", "-q"]
    else:
        argv = [
            "merge",
            "--model",
            base,
            "--model",
            base + ":0.3",
            "-o",
            str(out / "o.safetensors"),
            "--save-dtype",
            "fp32",
            "-q",
        ]
    orphan = _kill_mid_write(argv, out)
    assert os.path.getsize(out / orphan) > 0
    m = tempfiles._TAGGED.match(orphan)
    assert m is not None, orphan  # the owner tag: pid and start time
    # Somebody else's files in the same folder: never touched.
    (out / "notes.lorakit-tmp").write_text("not ours")
    (out / "keep.tmp").write_text("not ours")
    p = _cli("bake", small, "--lora", small_lora, "-o", str(out / "next.safetensors"), "-q")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert not (out / orphan).exists()
    assert "removed" in err and orphan in err and "interrupted lorakit run" in err, err
    assert sorted(os.listdir(out)) == ["keep.tmp", "next.safetensors", "notes.lorakit-tmp"]


def test_sweep_keeps_a_live_process_temp_file_and_removes_a_dead_ones(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        start = tempfiles.start_time(live.pid)
        assert start is not None
        names = {
            "live": f".o.safetensors.{live.pid}-{start}.0123abcd{tempfiles.SUFFIX}",
            "dead": f".o.safetensors.{dead.pid}-1.0123abcd{tempfiles.SUFFIX}",
            # the live pid, but a start time of another process: the pid was reused, the owner is gone
            "reused": f".o.safetensors.{live.pid}-{(start or 0) + 7}.0123abcd{tempfiles.SUFFIX}",
            "mine": os.path.basename(tempfiles.temp_path(str(tmp_path / "o.safetensors"))),
            "untagged": f".o.safetensors.0123abcd{tempfiles.SUFFIX}",
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"x")
        removed = {os.path.basename(p) for p in tempfiles.sweep(str(tmp_path))}
        if tempfiles.start_time(os.getpid()) == 0:  # no /proc: a reused pid cannot be told apart
            assert removed == {names["dead"]}
        else:
            assert removed == {names["dead"], names["reused"]}
        assert sorted(os.listdir(tmp_path)) == sorted(n for k, n in names.items() if os.path.basename(n) not in removed)
    finally:
        live.kill()
        live.wait()


def test_report_write_sweeps_orphans_too(tmp_path, capsys):
    from lib_lorakit.ops.files import write_file

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".r.json.{dead.pid}-1.0123abcd{tempfiles.SUFFIX}"
    orphan.write_bytes(b"half a report")
    write_file(str(tmp_path / "r.json"), "{}\n")
    assert sorted(os.listdir(tmp_path)) == ["r.json"]
