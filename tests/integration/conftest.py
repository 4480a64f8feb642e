import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import glob  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
from live import base, lora  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="session", autouse=True)
def _remove_what_the_tests_wrote():
    """Checkpoints, merges and LoRAs the tests write into the host's folders (a few GB per run) go at the end."""
    start = time.time()
    yield
    from live import URL, call

    pats = ("lorakit-it-*", "lorakit-ui-*", "lorakit-t*-*")
    for var in ("LORAKIT_WEBUI_CKPT_DIR", "LORAKIT_WEBUI_LORA_DIR"):
        d = os.environ.get(var)
        if not d:
            continue
        for pat in pats:
            for p in glob.glob(os.path.join(d, pat)):
                if os.path.getmtime(p) >= start - 1:
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    if URL:
        call("POST", "/sdapi/v1/refresh-checkpoints", {})
