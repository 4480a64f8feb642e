"""The command line: exit codes 0 / 2 / 1, messages that name the problem, and no debris."""

import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch
from factories import files_in, tiny_checkpoint, write

from lib_lorakit.cli import main
from lib_lorakit.synth import make_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def inputs(tmp_path):
    base = tiny_checkpoint(tmp_path, "sdxl")
    lora = write(tmp_path, "style.safetensors", make_lora("sdxl", "lora", conv=False))
    return tmp_path, base, lora


def run(capsys, *args):
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_bake_ok_with_report(inputs, capsys):
    tmp, base, lora = inputs
    out, rep = str(tmp / "out.safetensors"), str(tmp / "report.json")
    code, stdout, err = run(
        capsys, "bake", base, "--lora", f"{lora}:0.7:0.3", "-o", out, "--report", rep, "--blocks", "style=INALL", "-q"
    )
    assert code == 0, err
    assert "style @ 0.7 te 0.3" in stdout and "Baked" in stdout
    report = json.load(open(rep))
    assert report["loras"][0]["strength"] == 0.7 and report["output"]["path"] == out
    assert os.path.exists(out)


def test_json_and_dry_run(inputs, capsys):
    tmp, base, lora = inputs
    code, stdout, _ = run(capsys, "bake", base, "--lora", lora, "--dry-run", "--json")
    assert code == 0 and json.loads(stdout)["dry_run"] is True
    assert sorted(files_in(tmp)) == ["sdxl-base.safetensors", "style.safetensors"]


def test_scale_source_flag_reaches_the_report(inputs, capsys):
    tmp, base, lora = inputs
    code, stdout, _ = run(capsys, "bake", base, "--lora", lora, "--dry-run", "--json", "--scale-source", "runtime")
    assert code == 0 and json.loads(stdout)["loras"][0]["scale"]["scale_source"] == "runtime"


def _truncated(tmp, base):
    p = str(tmp / "truncated.safetensors")
    data = open(base, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    return p


def _bad_header(tmp, base):
    p = str(tmp / "badheader.safetensors")
    raw = b"{this is not json"
    open(p, "wb").write(struct.pack("<Q", len(raw)) + raw)
    return p


@pytest.mark.parametrize(
    "case,match",
    [
        ("truncated base", r"truncated\.safetensors: not a valid safetensors file: .*truncated"),
        ("bad header lora", r"badheader\.safetensors: not a valid safetensors file: the header is not valid JSON"),
        ("wrong architecture", r"is a LoRA for SD1\.5 .*but the checkpoint .* is SDXL"),
        ("nan weights", r"nan\.safetensors has NaN/inf weights"),
        ("missing file", r"nope\.safetensors: file not found"),
        ("existing output", r"already exists.*\nFix: Choose another name, or turn on the overwrite option"),
        ("bad strength", r"'abc' in block weights|not a number"),
    ],
)
def test_bad_inputs_exit_2_with_clear_message_and_no_output(inputs, capsys, case, match):
    tmp, base, lora = inputs
    out = str(tmp / "out.safetensors")
    args = ["bake", base, "--lora", lora, "-o", out, "-q"]
    if case == "truncated base":
        args[1] = _truncated(tmp, base)
    elif case == "bad header lora":
        args[3] = _bad_header(tmp, base)
    elif case == "wrong architecture":
        args[3] = write(tmp, "sd15.safetensors", make_lora("sd15", "lora", conv=False))
    elif case == "nan weights":
        sd = make_lora("sdxl", "lora", conv=False)
        k = next(iter(sd))
        sd[k] = torch.full_like(sd[k], float("nan"))
        args[3] = write(tmp, "nan.safetensors", sd)
    elif case == "missing file":
        args[3] = str(tmp / "nope.safetensors")
    elif case == "existing output":
        open(out, "wb").write(b"keep me")
    elif case == "bad strength":
        args += ["--blocks", "style=1,abc"]
    before = set(files_in(tmp))
    code, _, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and re.search(match, err, re.S), err
    after = set(files_in(tmp))
    assert after == before  # no output, no temporary file
    if case == "existing output":
        assert open(out, "rb").read() == b"keep me"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bake"])
    assert e.value.code == 2


def test_unexpected_failure_exits_1(inputs, capsys, monkeypatch):
    tmp, base, lora = inputs
    import lib_lorakit.bake.engine as bk

    def boom(*a, **k):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(bk, "check_lora_values", boom)
    code, _, err = run(capsys, "bake", base, "--lora", lora, "-o", str(tmp / "o.safetensors"), "-q")
    assert code == 1 and "unexpectedly" in err and "ZeroDivisionError" in err
    assert not os.path.exists(tmp / "o.safetensors")


def test_blocks_must_name_a_lora(inputs, capsys):
    tmp, base, lora = inputs
    code, _, err = run(capsys, "bake", base, "--lora", lora, "-o", str(tmp / "o.safetensors"), "--blocks", "other=ALL")
    assert code == 2 and "names no --lora (LoRAs: style)" in err


def test_module_entry_point_and_demo(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lib_lorakit", "demo", "--dir", str(tmp_path / "demo")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "refused, as it should be" in r.stdout and "Check: a baked attention weight matches" in r.stdout
    assert os.path.exists(tmp_path / "demo" / "models" / "Stable-diffusion" / "demo-sdxl-baked.safetensors")
    assert not os.path.exists(tmp_path / "demo" / "never-written.safetensors")


@pytest.mark.parametrize("code,status,err", [(None, 0, ""), (3, 3, ""), ("no such recipe", 1, "no such recipe")])
def test_leave_runs_exit_handlers_and_joins_threads(tmp_path, code, status, err):
    """The command line exits without the interpreter's teardown, but after what a user may rely on:
    buffered output, atexit handlers (logging's flush), threads that are not daemons."""
    done = tmp_path / "thread.txt"
    prog = (
        "import atexit, sys, threading, time\n"
        "from lib_lorakit.cli import leave\n"
        "atexit.register(lambda: print('handler ran'))\n"
        f"threading.Thread(target=lambda: (time.sleep(0.3), open({str(done)!r}, 'w').write('x'))).start()\n"
        "print('buffered', end='')\n"
        f"leave({code!r})\n"
        "print('not reached')\n"
    )
    r = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == status and r.stdout == "bufferedhandler ran\n" and r.stderr.strip() == err
    assert done.read_text() == "x"


def test_module_entry_point_exit_codes(tmp_path):
    """``python -m lib_lorakit``: usage errors exit 2, --version 0, bad input 2 with its message."""

    def run_module(*args):
        return subprocess.run(
            [sys.executable, "-m", "lib_lorakit", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    r = run_module("--version")
    assert r.returncode == 0 and r.stdout.startswith("lorakit ")
    r = run_module("bake")
    assert r.returncode == 2 and "required: base" in r.stderr
    r = run_module("inspect", str(tmp_path / "missing.safetensors"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "missing.safetensors" in r.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_real_signal_mid_write_leaves_no_debris(tmp_path, sig):
    """Send a real signal while the output is being written; nothing may remain.

    On a loaded machine the signal can land after the final rename; such an attempt must have left a
    complete output and no temporary file, and is repeated until one attempt is really interrupted."""
    import signal
    import time

    from lib_lorakit.formats.safetensors_io import SafetensorsFile
    from lib_lorakit.synth import write_checkpoint

    base = str(tmp_path / "base.safetensors")
    write_checkpoint(base, "sdxl", tiny=8, seed=1)  # ~70 MB: the bake takes long enough to interrupt
    lora = write(tmp_path, "l.safetensors", make_lora("sdxl", "lora", tiny=8, conv=True, rank=4))
    interrupted = 0
    for attempt in range(6):
        out_dir = tmp_path / f"out{attempt}"
        out_dir.mkdir()
        # fp32: a longer write to land the signal in. SIGINT back to its default for the child: a runner that
        # started these tests in the background (`cmd &` in a script) hands SIGINT down ignored.
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lib_lorakit",
                "bake",
                base,
                "--lora",
                lora,
                "-o",
                str(out_dir / "o.safetensors"),
                "--save-dtype",
                "fp32",
                "-q",
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.time() + 60
        while time.time() < deadline and not any(n.endswith(".lorakit-tmp") for n in os.listdir(out_dir)):
            if p.poll() is not None:
                break
            time.sleep(0.002)
        assert p.poll() is None, "the bake finished before it could be interrupted"
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=60)
        if p.returncode == 0:  # the signal came after the rename: a whole file and nothing else
            assert os.listdir(out_dir) == ["o.safetensors"]
            with SafetensorsFile(str(out_dir / "o.safetensors")):
                pass
            continue
        assert p.returncode == 130, err
        assert "no output was written" in err
        assert os.listdir(out_dir) == []
        interrupted += 1
        break
    assert interrupted == 1
