import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import REFERENCE  # noqa: E402

# the CLI remembers file hashes in lorakit's data folder: keep the tests' out of the user's home
os.environ.setdefault("LORAKIT_DATA_DIR", tempfile.mkdtemp(prefix="lorakit-test-data-"))


@pytest.fixture
def shared_reference():
    """The reference key tables; tests using them skip where ../shared is absent (users' machines)."""
    if not os.path.isdir(REFERENCE):
        pytest.skip("../shared/reference is not present")
    return REFERENCE
