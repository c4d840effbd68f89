"""Schedulers by name, built from the checkpoint's own scheduler config (diffusers' ``from_config``).

The names follow the usual UI names; each maps to a diffusers scheduler class plus the config overrides
that make it that sampler (``dpmpp_2m_karras`` = DPMSolverMultistepScheduler with Karras sigmas). Every
sampler run builds a fresh scheduler, because diffusers schedulers carry per-run state (step index,
multistep history).
"""
from __future__ import annotations

from typing import Any, Literal, get_args

SchedulerName = Literal["euler", "euler_a", "ddim", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)

# name -> (diffusers class, config overrides)
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, config: dict):
    """A fresh scheduler ``name`` configured from a checkpoint's ``scheduler_config.json`` dict."""
    import diffusers

    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}'; known: {', '.join(SCHEDULER_NAMES)}")
    class_name, overrides = _SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(dict(config), **overrides)
