"""Param types shared by several nodes, defined once so their bounds and descriptions agree.

A node that needs another description uses ``Annotated[Seed, Field(description=...)]``: the bounds stay.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from nodegraph.sockets import Randomizable

# "random" is also accepted: the engine draws a value once per run, keys and records it
Seed = Annotated[int, Field(ge=0, le=2**63 - 1, description="noise seed (CPU torch.Generator); \"random\" for a new "
                                                            "one each run"), Randomizable()]
Steps = Annotated[int, Field(ge=1, le=1000, description="scheduler steps (before strength)")]
Guidance = Annotated[float, Field(ge=0, le=100, description="classifier-free guidance scale; <= 1 turns it off")]
Strength = Annotated[float, Field(gt=0, le=1, description="how much to change: the last int(steps*strength) steps run")]
DenoisingStart = Annotated[float, Field(ge=0, lt=1, description="hand-off: continue a partly denoised latent from this "
                                                                "fraction of the schedule (strength ignored); 0 = off")]
DenoisingEnd = Annotated[float, Field(gt=0, le=1, description="hand-off: stop at this fraction of the schedule and "
                                                              "return the noisy latent; 1 = off")]
StartStep = Annotated[int, Field(ge=0, le=1000, description="skip this many steps of the schedule (ComfyUI's "
                                                         "start_at_step); an image latent is noised to the first "
                                                         "step run; 0 = off")]
EndStep = Annotated[int, Field(ge=0, le=10000, description="stop before this step and return the noisy latent "
                                                           "(ComfyUI's end_at_step); 0 = run to the end")]
