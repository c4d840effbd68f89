"""The MODEL, CLIP and VAE handles a checkpoint loads into: the diffusers / transformers modules with
what the nodes that use them must know (family, source, scaling factors, memos shared by every user).

The modules are shared by every node that uses the checkpoint. A patch (an IP-Adapter or a LoRA on the
UNet, a LoRA on the text encoders) is carried by a copy of the handle and applied to the shared module
only while one sampler run or one CLIPEncode uses that copy, holding the module's ``module_lock``: runs
on one module take turns, so a run with the unpatched handle never sees another run's patch."""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

from nodegraph.lazy import lazy

from nodegraph.errors import NodeError

from ._families import Family, family
from ._memory import compute_device

torch = lazy("torch")
_UPCAST_LOCK = threading.Lock()

_MODULE_LOCKS: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_MODULE_LOCKS_GUARD = threading.Lock()


def module_lock(module) -> threading.RLock:
    """The lock of one shared module (a UNet, a text encoder), held while a run applies its patches and uses it.

    Re-entrant, so that code already holding it (a patch, a nested run) on the same thread does not deadlock;
    weakly keyed, so that a released model's module takes its lock with it."""
    with _MODULE_LOCKS_GUARD:
        lock = _MODULE_LOCKS.get(module)
        if lock is None:
            lock = _MODULE_LOCKS[module] = threading.RLock()
        return lock


class _OfFamily:
    """What a handle's ``family`` name tells: its Family object and whether it is SDXL."""

    family: str

    @property
    def kind(self) -> Family:
        return family(self.family)

    @property
    def is_sdxl(self) -> bool:
        return self.kind.text_time


@dataclass(eq=False)
class ModelHandle(_OfFamily):
    """MODEL: the denoising UNet, the checkpoint's scheduler config and what samplers must know about it."""

    unet: Any
    scheduler_config: dict
    family: str  # a Family's name: "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    source: str
    vae_scale_factor: int = 8
    patches: tuple = ()  # nodes.denoise.ModelPatch objects applied around each sampler run

    def modules(self) -> list[tuple[str, Any]]:
        """The modules a sampler runs: the UNet (and what patches add to it, which follow it)."""
        return [("unet", self.unet)]

    def with_patch(self, patch) -> "ModelHandle":
        """A new MODEL that applies ``patch`` while sampling; this one is unchanged."""
        return replace(self, patches=(*self.patches, patch))

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def label(self) -> str:
        return self.kind.label_for(self.inpainting)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return compute_device(self.unet)

    def describe(self) -> str:
        kind = "inpainting UNet (9 input channels)" if self.inpainting else f"UNet ({self.in_channels} input channels)"
        return f"{self.kind.title} ({self.label}) {kind} from {self.source}"


class ClipPatch:
    """A change to the shared text encoder(s) that lives only for one encode (a LoRA, say): the CLIP
    counterpart of ``denoise.ModelPatch``. ``applied`` changes the encoders and restores them after."""

    def applied(self, clip) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@dataclass(eq=False)
class ClipHandle(_OfFamily):
    """CLIP: tokenizer + text encoder. Remembers the empty prompt's embedding (the default negative).

    SDXL has two: ``text_encoder`` (CLIP ViT-L) and ``text_encoder_2`` (OpenCLIP bigG with projection,
    which also gives the pooled embedding); the refiner has only the second (``text_encoder`` None)."""

    tokenizer: Any
    text_encoder: Any
    family: str
    source: str
    memo: dict = field(default_factory=dict, repr=False)  # the empty prompt's conditioning, per dtype/device
    # SDXL's second encoder (OpenCLIP bigG, which also gives the pooled embedding); None for SD 1.x/2.x
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    # SDXL pipelines' config: with no negative prompt the negative embeddings are zeros, not the encoded ""
    force_zeros_for_empty_prompt: bool = False
    patches: tuple = ()  # ClipPatch objects applied around each encode (a LoRA on the text encoders)

    def with_patches(self, patches: tuple) -> "ClipHandle":
        """A new CLIP that applies ``patches`` while encoding; this one is unchanged. It has its own memo: the
        empty prompt's embedding depends on the patches."""
        return replace(self, patches=tuple(patches), memo={})

    @contextlib.contextmanager
    def patched(self):
        """The text encoders for one encode: locked (other runs wait) and with this CLIP's patches applied,
        which are removed again afterwards, even on error."""
        with contextlib.ExitStack() as stack:
            for _, encoder in self.encoders:
                stack.enter_context(module_lock(encoder))
            for patch in self.patches:
                stack.enter_context(patch.applied(self))
            yield self

    @property
    def encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs in use, in diffusers' order."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(t, e) for t, e in pairs if e is not None]

    @property
    def device(self) -> torch.device:
        return compute_device(self.encoders[0][1])

    @property
    def dtype(self) -> torch.dtype:
        return self.encoders[-1][1].dtype


@dataclass(eq=False)
class VaeHandle:
    """VAE: the autoencoder with its spatial factor (8) and latent scaling factor."""

    vae: Any
    family: str
    source: str
    memo: dict = field(default_factory=dict, repr=False)  # the float32 copy for force_upcast

    @property
    def config(self):
        if self.vae is None:
            raise NodeError(f"{self.source} has no VAE weights (no first_stage_model.* tensors): load one with LoadVAE "
                            "and link its vae output instead of the checkpoint's")
        return self.vae.config

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """What latents are multiplied by (1 for a family whose pipelines use them unscaled, like MoVQ's)."""
        if not family(self.family).scaled_latents:
            return 1.0
        return float(self.config.scaling_factor)

    @property
    def decode_kwargs(self) -> dict:
        """Extra arguments of ``decode``: a VQ autoencoder decodes the latents as they are, unquantised, as
        diffusers' Kandinsky pipelines do (``force_not_quantize``)."""
        return {"force_not_quantize": True} if hasattr(self.vae, "quantize") else {}

    @property
    def shift_factor(self) -> float | None:
        return getattr(self.config, "shift_factor", None)

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def force_upcast(self) -> bool:
        """SDXL's VAE overflows in float16; diffusers runs it in float32 then (``config.force_upcast``)."""
        return bool(getattr(self.config, "force_upcast", False))

    def compute_module(self):
        """The autoencoder to run: a float32 copy (made once) when an SDXL VAE is float16 and its config says
        force_upcast, as diffusers' SDXL pipelines upcast it; else the VAE itself. A copy rather than
        ``vae.to(float32)`` and back, so nodes sharing the handle never see it change."""
        # only the pipelines of families that upcast do (SDXL's); SD 1.x/2.x pipelines run a float16 VAE as it is
        if not (family(self.family).upcast_vae_draws() and self.force_upcast and self.config and
                self.vae.dtype == torch.float16):
            return self.vae
        with _UPCAST_LOCK:
            if "float32" not in self.memo:
                import copy

                self.memo["float32"] = copy.deepcopy(self.vae).to(torch.float32)
            return self.memo["float32"]
