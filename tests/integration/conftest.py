import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from live import base, lora  # noqa: E402,F401  (fixtures)
