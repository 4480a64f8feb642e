"""The README's commands are the ones CI and users run."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(p):
    with open(os.path.join(ROOT, p)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    m = re.search(r"^python3 -m venv \.venv .*pytest -q( .*)?$", read("README.md"), re.M)
    assert m, "README must hold a one-line test command"
    assert m.group(0) in read(".ci/run").splitlines()


def test_readme_has_a_demo_command_that_sets_up_and_runs():
    m = re.search(r"^python3 -m venv .*lib_lorakit demo$", read("README.md"), re.M)
    assert m, "README must hold a one-line demo command"


def test_layout_has_the_webui_extension_shape():
    for p in ("lib_lorakit/__init__.py", "install.py", "README.md", "tests"):
        assert os.path.exists(os.path.join(ROOT, p)), p
