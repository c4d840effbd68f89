"""Schedulers by name, built from the checkpoint's own scheduler config (diffusers' ``from_config``).

A name is a sampler, optionally followed by a sigma schedule: ``dpmpp_2m_karras`` = DPMSolverMultistepScheduler
with Karras sigmas, ``euler_trailing`` = EulerDiscreteScheduler with ``timestep_spacing="trailing"``. Without a
suffix the checkpoint's own config decides. The suffixes are diffusers' options: ``_karras`` / ``_exponential``
(``use_karras_sigmas`` / ``use_exponential_sigmas``, for the schedulers that have them) and ``_linspace`` /
``_trailing`` (``timestep_spacing``). Every sampler run builds a fresh scheduler, because diffusers schedulers
carry per-run state (step index, multistep history).
"""
from __future__ import annotations

from typing import Any, Literal

from nodegraph.errors import NodeError

# sampler -> (diffusers class, config overrides, takes Karras / exponential sigmas)
_SAMPLERS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "euler": ("EulerDiscreteScheduler", {}, True),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, False),
    "heun": ("HeunDiscreteScheduler", {}, True),
    "dpm_2": ("KDPM2DiscreteScheduler", {}, True),
    "lms": ("LMSDiscreteScheduler", {}, True),
    "ddim": ("DDIMScheduler", {}, False),
    "ddpm": ("DDPMScheduler", {}, False),  # Kandinsky 2.2's decoders ship it (with a learned variance)
    "pndm": ("PNDMScheduler", {}, False),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, True),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, True),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}, True),
    "unipc": ("UniPCMultistepScheduler", {}, True),
}
_SIGMAS = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
_SPACING = {"linspace": {"timestep_spacing": "linspace"}, "trailing": {"timestep_spacing": "trailing"}}
# what a diffusers class needs beyond diffusers itself (it is a placeholder without it)
_EXTRA_PACKAGE = {"LMSDiscreteScheduler": "scipy", "DPMSolverSDEScheduler": "torchsde"}


def _table() -> dict[str, tuple[str, dict[str, Any]]]:
    table = {}
    for sampler, (cls, overrides, sigmas) in _SAMPLERS.items():
        table[sampler] = (cls, overrides)
        for suffix, extra in {**(_SIGMAS if sigmas else {}), **_SPACING}.items():
            table[f"{sampler}_{suffix}"] = (cls, {**overrides, **extra})
    return table


_SCHEDULERS = _table()
SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULERS)
SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]


def make_scheduler(name: str, config: dict):
    """A fresh scheduler ``name`` configured from a checkpoint's ``scheduler_config.json`` dict."""
    import diffusers

    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}'; known: {', '.join(SCHEDULER_NAMES)}")
    class_name, overrides = _SCHEDULERS[name]
    try:
        return getattr(diffusers, class_name).from_config(dict(config), **overrides)
    except ImportError as exc:  # diffusers' placeholder class for a missing optional package
        package = _EXTRA_PACKAGE.get(class_name, "its optional dependency")
        raise NodeError(f"scheduler '{name}' ({class_name}) needs the package {package}: pip install {package}") \
            from exc
