"""ComfyUI workflows in nodegraph: tell the formats apart and convert ComfyUI's node types (docs/comfy.md).

Light at import (no torch): validation of an imported workflow must stay as fast as a native one."""
from .convert import COMFY_API, COMFY_EDITOR, NODEGRAPH, detect_format, import_api, object_info, to_nodegraph

__all__ = ["COMFY_API", "COMFY_EDITOR", "NODEGRAPH", "detect_format", "import_api", "object_info", "to_nodegraph"]
