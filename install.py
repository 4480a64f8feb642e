"""Run by the WebUI when it loads extensions: install what lorakit needs and the host lacks.

Uses the host's own ``launch`` helpers, installs only what is missing, and does
nothing at all when the WebUI runs with ``--skip-install``.
"""

import launch

# distribution name -> pip requirement. torch and gradio always come with the host.
REQUIREMENTS = {
    "safetensors": "safetensors>=0.4",
    "numpy": "numpy",
    "pillow": "pillow",
}


def main() -> None:
    args = getattr(launch, "args", None)
    if getattr(args, "skip_install", False):
        return
    for dist, req in REQUIREMENTS.items():
        if not launch.is_installed(dist):
            launch.run_pip(f'install "{req}"', f"lorakit requirement: {req}")


main()
