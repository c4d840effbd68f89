"""nodegraph: a typed, cached node graph engine for diffusion image editing.

Everything a plugin author needs is importable from here::

    from nodegraph import node, IMAGE, MASK, Image, Mask, RunContext, NodeError

Names are loaded on first use, so ``import nodegraph`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from .versions import version as _version

__version__ = _version()

# public name -> module that defines it
_EXPORTS = {
    **dict.fromkeys(["node", "NodeDef", "InputSpec"], "nodegraph.definitions"),
    **dict.fromkeys(["socket", "Socket", "InputPath", "Randomizable", "IMAGE", "MASK", "LATENT", "CONDITIONING",
                     "MODEL", "CLIP", "VAE", "INT", "FLOAT", "STRING", "BOOLEAN", "ANY", "Image", "Mask", "Latent",
                     "Conditioning", "Model", "Clip", "Vae"], "nodegraph.sockets"),
    **dict.fromkeys(["RunContext", "RunConfig", "RunRecord", "ProgressEvent", "InterruptFlag", "NodeWarning"],
                    "nodegraph.context"),
    **dict.fromkeys(["NodegraphError", "NodeError", "NodeFailed", "WorkflowInvalid", "Interrupted", "Issue",
                     "PluginError", "NodeDefinitionError"], "nodegraph.errors"),
    **dict.fromkeys(["disk_cacheable"], "nodegraph.serialize"),
    **dict.fromkeys(["Engine"], "nodegraph.api"),
    **dict.fromkeys(["RunResult"], "nodegraph.executor"),
    **dict.fromkeys(["Limits"], "nodegraph.limits"),
    **dict.fromkeys(["Workflow", "WorkflowBuilder"], "nodegraph.workflow"),
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nodegraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
