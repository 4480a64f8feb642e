"""lib_lorakit imports without the WebUI: every module except host/ loads with `modules` blocked."""

import os
import pkgutil
import subprocess
import sys

import lib_lorakit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import importlib, importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('modules', 'backend', 'modules_forge', 'ldm_patched', 'launch'):
            raise ImportError(f'blocked import of WebUI module {name}')
        return None

sys.meta_path.insert(0, Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
leaked = [m for m in sys.modules if m.split('.')[0] in ('modules', 'backend', 'modules_forge')]
assert not leaked, leaked
print('imported', len(sys.argv) - 1)
"""


def library_modules():
    names = []
    for m in pkgutil.walk_packages(lib_lorakit.__path__, "lib_lorakit."):
        if m.name.startswith("lib_lorakit.host") or m.name == "lib_lorakit.__main__":
            continue
        names.append(m.name)
    return names


def test_library_imports_with_webui_modules_blocked():
    names = library_modules()
    assert "lib_lorakit.bake" in names and "lib_lorakit.networks.lokr" in names
    r = subprocess.run([sys.executable, "-c", CHILD, *names], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"imported {len(names)}" in r.stdout


def test_blocker_really_blocks():
    r = subprocess.run([sys.executable, "-c", CHILD, "modules.shared"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "blocked import of WebUI module modules" in r.stderr
