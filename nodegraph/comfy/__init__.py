"""ComfyUI workflows in nodegraph: tell the formats apart and convert ComfyUI's node types (docs/comfy.md).

Light at import (no torch): validation of an imported workflow must stay as fast as a native one."""
from .convert import COMFY_API, NODEGRAPH, detect_format, import_api, object_info

__all__ = ["COMFY_API", "NODEGRAPH", "detect_format", "import_api", "object_info"]
