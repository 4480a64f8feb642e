import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import REFERENCE  # noqa: E402


@pytest.fixture
def shared_reference():
    """The reference key tables; tests using them skip where ../shared is absent (users' machines)."""
    if not os.path.isdir(REFERENCE):
        pytest.skip("../shared/reference is not present")
    return REFERENCE
