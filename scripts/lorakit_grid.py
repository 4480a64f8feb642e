"""txt2img Script: "lorakit: LoRA strength grid" (the class is built by lib_lorakit.host)."""

from lib_lorakit.host.grid_script import script_class

Script = script_class()
