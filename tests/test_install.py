"""install.py talks to the host only through its `launch` helpers."""

import os
import runpy
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_launch(installed: set[str], skip: bool):
    mod = types.ModuleType("launch")
    mod.args = types.SimpleNamespace(skip_install=skip)
    mod.calls = []
    mod.is_installed = lambda name: name in installed
    mod.run_pip = lambda cmd, desc=None: mod.calls.append((cmd, desc))
    return mod


@pytest.fixture
def run_install(monkeypatch):
    def run(installed, skip=False):
        mod = fake_launch(installed, skip)
        monkeypatch.setitem(sys.modules, "launch", mod)
        runpy.run_path(os.path.join(ROOT, "install.py"))
        return mod.calls

    return run


def test_installs_only_what_is_missing(run_install):
    calls = run_install({"safetensors", "numpy"})
    assert calls == [('install "pillow"', "lorakit requirement: pillow")]


def test_nothing_when_all_present(run_install):
    assert run_install({"safetensors", "numpy", "pillow"}) == []


def test_skip_install_is_honoured(run_install):
    assert run_install(set(), skip=True) == []
