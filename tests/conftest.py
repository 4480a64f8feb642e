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


@pytest.fixture
def model_dirs(tmp_path):
    """Empty model folders laid out as the WebUI's: (models/Stable-diffusion, models/Lora)."""
    ckpt = tmp_path / "models" / "Stable-diffusion"
    loras = tmp_path / "models" / "Lora"
    ckpt.mkdir(parents=True)
    loras.mkdir(parents=True)
    return ckpt, loras


@pytest.fixture(autouse=True)
def _sigterm_handler_restored():
    """In-process CLI runs install a SIGTERM handler; each test must leave the one it found."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    yield
    assert signal.getsignal(signal.SIGTERM) == before, "a test left its SIGTERM handler installed"
