"""lorakit in the WebUI: the lorakit tab, its settings, and the /lorakit/v1 API."""

from lib_lorakit.host.extension import register

register()
