"""``nodegraph serve``: ComfyUI's HTTP and websocket API over one long-lived Engine (docs/server.md).

``nodegraph.server.app`` has the server (``Server``, ``ServerConfig``, ``serve``, ``Running``); this package
imports nothing at import time, so the CLI stays light."""
