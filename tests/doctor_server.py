"""The standalone launcher with a host that renders (tests only): ``python tests/doctor_server.py CKPT LORAS PORT``.

The standalone launcher cannot generate; for the bake doctor's browser test its context gets the
weight renderer of tests/fake_render.py as its generation backend, everything else as shipped."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import uvicorn
    from fake_render import WeightRenderer

    from lib_lorakit.ui.standalone import create_app

    ckpt, loras, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    app, service = create_app(ckpt, loras)
    service.backend = lambda what, fix="": WeightRenderer(ckpt, loras)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
