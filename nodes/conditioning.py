"""CLIPEncode and the CONDITIONING value: prompt embeddings as diffusers' ``encode_prompt`` makes them.

A CONDITIONING carries what the UNet needs besides the latents for one side of classifier-free guidance:

- ``embeds``: ``encoder_hidden_states`` (B, 77·k, D);
- ``pooled`` and ``added``: extra per-sample UNet conditioning (SDXL's pooled text embeds and time ids,
  IP-Adapter image embeds go here later; the sampler batches them like ``embeds``);
- ``uncond``: the empty prompt's conditioning from the same CLIP. A sampler with no negative linked uses it,
  which is what diffusers does when ``negative_prompt`` is None (it encodes ``""``). Carrying it here keeps
  samplers free of a CLIP input; it is computed once per CLIP and shared. SDXL checkpoints whose pipeline
  config sets ``force_zeros_for_empty_prompt`` (SDXL base and inpainting do; the refiner does not) use
  zeros instead, for both the embeddings and the pooled embedding, as ``StableDiffusionXLPipeline`` does;
- ``size``: SDXL micro-conditioning set by ``SDXLSizeConditioning`` (original size, crop, target size,
  aesthetic score); the sampler turns it into the UNet's ``time_ids``, defaulting to the sampled size.

SDXL (``StableDiffusionXLPipeline.encode_prompt``): both encoders' penultimate hidden states (no final
layer norm) are concatenated along the feature axis, and the pooled embedding is the second encoder's
projected output. ``prompt_2`` (default: the prompt) goes to the second encoder.

Patches: a CLIP made by ApplyLoRA carries ``patches`` (``ClipPatch``); ``encode_prompt`` runs the text
encoders inside ``ClipHandle.patched``, which holds each encoder's lock and applies the patches for the
length of the encode, so a concurrent encode with the plain CLIP never sees them. The empty prompt is
remembered per CLIP handle, so a patched CLIP's default negative is encoded with its patches.

Long prompts: ``long_prompt="truncate"`` (default) cuts at 77 tokens and warns with the removed text, exactly
as diffusers does; ``"chunk"`` encodes 75-token windows (each wrapped in BOS/EOS and padded to 77) and
concatenates them along the sequence axis, as A1111/ComfyUI do. For prompts of 75 tokens or fewer both
give the same embedding. Samplers pad the shorter of positive/negative with empty-prompt chunks.
"""
from __future__ import annotations

from nodegraph.lazy import lazy

from dataclasses import dataclass, field, replace
from typing import Annotated, Literal, Optional

torch = lazy("torch")
from pydantic import Field

from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph import node
from nodegraph.serialize import disk_cacheable
from nodegraph.sockets import CONDITIONING, Clip, Conditioning, SpaceRule

from . import prompt_weights
from ._memory import compute_device, on_device


@disk_cacheable
@dataclass
class PromptEmbeds:
    """CONDITIONING: embeddings of one prompt (one side of classifier-free guidance)."""

    embeds: torch.Tensor  # (B, 77*k, D): the UNet's encoder_hidden_states
    pooled: Optional[torch.Tensor] = None  # SDXL: pooled text embedding (added_cond_kwargs["text_embeds"])
    added: dict = field(default_factory=dict)  # more added_cond_kwargs, batched like embeds (SDXL, IP-Adapter)
    uncond: Optional["PromptEmbeds"] = None  # the empty prompt from the same CLIP: the default negative
    family: str = "sd1"
    text: str = ""
    size: dict = field(default_factory=dict)  # SDXL micro-conditioning (SDXLSizeConditioning)

    @property
    def batch(self) -> int:
        return int(self.embeds.shape[0])


def _hidden_states(text_encoder, ids: torch.Tensor, attention_mask, clip_skip: int) -> torch.Tensor:
    """diffusers encode_prompt: last hidden state, or the layer ``clip_skip`` before it through the final norm."""
    if not clip_skip:
        return text_encoder(ids, attention_mask=attention_mask)[0]
    out = text_encoder(ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]
    # transformers 5 puts final_layer_norm on CLIPTextModel itself; 4.x under .text_model
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def _encode_ids(clip, ids: torch.Tensor, attention: torch.Tensor, clip_skip: int) -> torch.Tensor:
    encoder = clip.text_encoder
    device = compute_device(encoder)
    mask = attention.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
    with torch.inference_mode():
        embeds = _hidden_states(encoder, ids.to(device), mask, clip_skip)
    return embeds.to(dtype=encoder.dtype, device=device).clone()  # a normal tensor outside inference mode


def token_rows(tokenizer, text: str, long_prompt: str = "truncate", warn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, (k, 77) each: one row cut at 77 tokens as diffusers does (``warn``
    is told what was cut), or with ``long_prompt="chunk"`` 75-token windows each wrapped in BOS/EOS."""
    max_length = tokenizer.model_max_length
    if long_prompt == "chunk":
        ids = tokenizer(text, add_special_tokens=False).input_ids
        window = max_length - 2
        pad = prompt_weights.pad_token(tokenizer)
        rows, masks = [], []
        for chunk in [ids[i:i + window] for i in range(0, len(ids), window)] or [[]]:
            row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
            masks.append([1] * len(row) + [0] * (max_length - len(row)))
            rows.append(row + [pad] * (max_length - len(row)))
        return torch.tensor(rows), torch.tensor(masks)
    inputs = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    untruncated = tokenizer(text, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] >= inputs.input_ids.shape[-1] and not torch.equal(inputs.input_ids, untruncated):
        removed = tokenizer.batch_decode(untruncated[:, max_length - 1:-1])[0]
        if warn is not None:
            warn(f"the prompt is longer than CLIP's {max_length} tokens and was truncated; removed: {removed!r} "
                 "(set long_prompt='chunk' to keep it)")
    return inputs.input_ids, inputs.attention_mask


def encode_text(clip, text: str, clip_skip: int = 0, long_prompt: str = "truncate",
                warn=None, syntax: str = "plain") -> torch.Tensor:
    """Prompt -> (1, 77*k, D) embeddings, the arithmetic of diffusers' ``encode_prompt``; with
    ``syntax="comfy"``, ComfyUI's weighted windows (nodes/prompt_weights.py)."""
    if syntax == "compel":
        return prompt_weights.compel_embeds(clip, text, clip_skip, long_prompt)[0]
    if syntax == "comfy":
        ids, weights = prompt_weights.with_empty_window(clip.tokenizer, text)
        embeds = prompt_weights.apply_weights(_encode_ids(clip, ids, torch.ones_like(ids), clip_skip), weights)
    else:
        ids, attention = token_rows(clip.tokenizer, text, long_prompt, warn)
        embeds = _encode_ids(clip, ids, attention, clip_skip)  # (k, 77, D)
    return embeds.reshape(1, -1, embeds.shape[-1])


# ---------------------------------------------------------------------------------------------- SDXL

def _sdxl_encoder_output(encoder, ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """diffusers' SDXL encode_prompt for one encoder: hidden_states[-(clip_skip + 2)] and, for the encoder
    with projection, the pooled (projected) embedding."""
    device = compute_device(encoder)
    with torch.inference_mode():
        out = encoder(ids.to(device), output_hidden_states=True)
    pooled = out[0] if out[0].ndim == 2 else None
    hidden = out.hidden_states[-(clip_skip + 2)]
    return hidden.clone(), (pooled.clone() if pooled is not None else None)


def _encode_sdxl_comfy(clip, prompts: list[str], clip_skip: int) -> tuple[list, Optional[torch.Tensor]]:
    """Each encoder's weighted windows (ComfyUI's SDXL encoding); cut to the shorter side, as ComfyUI does."""
    hidden, pooled = [], None
    for (tokenizer, encoder), prompt in zip(clip.encoders, prompts):
        ids, weights = prompt_weights.with_empty_window(tokenizer, prompt)
        states, projected = _sdxl_encoder_output(encoder, ids, clip_skip)
        states = prompt_weights.apply_weights(states, weights)
        hidden.append(states.reshape(1, -1, states.shape[-1]))
        if projected is not None:
            pooled = projected[:1]
    cut = min(h.shape[1] for h in hidden)
    return [h[:, :cut] for h in hidden], pooled


def encode_text_sdxl(clip, text: str, text_2: Optional[str] = None, clip_skip: int = 0,
                     long_prompt: str = "truncate", warn=None, syntax: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt -> ((1, 77*k, D1 + D2) embeddings, (1, P) pooled), StableDiffusionXLPipeline.encode_prompt.

    Chunked prompts: each encoder sees the same number of 75-token windows (the shorter side padded with
    empty windows); the pooled embedding is the first window's, as ComfyUI does."""
    prompts = [text, text_2 or text] if clip.text_encoder is not None else [text_2 or text]
    if syntax == "compel":
        if text_2:
            raise NodeError("prompt_2 is not used with syntax 'compel': Compel gives both encoders the same prompt")
        return _sdxl_result(clip, *prompt_weights.compel_embeds(clip, text, clip_skip, long_prompt))
    if syntax == "comfy":
        hidden, pooled = _encode_sdxl_comfy(clip, prompts, clip_skip)
        return _sdxl_result(clip, torch.cat(hidden, dim=-1), pooled)
    pairs = clip.encoders
    ids = [token_rows(tok, p, long_prompt, warn if i == 0 else None)[0] for i, ((tok, _), p) in
           enumerate(zip(pairs, prompts))]
    count = max(i.shape[0] for i in ids)
    # the encoder with fewer windows gets empty ones: the ids of "" in one window
    ids = [torch.cat([i, token_rows(tok, "", "chunk")[0].repeat(count - i.shape[0], 1).to(i.dtype)])
           if i.shape[0] < count else i for i, (tok, _) in zip(ids, pairs)]
    hidden, pooled = [], None
    for chunk_ids, (_, encoder) in zip(ids, pairs):
        states, projected = _sdxl_encoder_output(encoder, chunk_ids, clip_skip)  # (k, 77, D)
        hidden.append(states)
        if projected is not None:
            pooled = projected[:1]
    embeds = torch.cat(hidden, dim=-1)
    return _sdxl_result(clip, embeds.reshape(1, -1, embeds.shape[-1]), pooled)


def _sdxl_result(clip, embeds: torch.Tensor, pooled: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, device = clip.dtype, clip.device  # diffusers casts to text_encoder_2's dtype
    if pooled is None:
        raise NodeError("this CLIP has no text encoder with projection (CLIPTextModelWithProjection), so it "
                        "cannot give SDXL's pooled embedding")
    return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- prompts

def empty_prompt(clip) -> PromptEmbeds:
    """The default negative, computed once per CLIP: the embedding of "" (diffusers' negative when none is
    given; with the CLIP's patches applied), or zeros for SDXL checkpoints with ``force_zeros_for_empty_prompt``."""
    zeros = bool(getattr(clip, "force_zeros_for_empty_prompt", False))
    key = ("zeros" if zeros else "", str(clip.dtype), str(clip.device))
    if key not in clip.memo:
        with clip.patched():
            if getattr(clip, "is_sdxl", False):
                embeds, pooled = encode_text_sdxl(clip, "")
                if zeros:
                    embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
                clip.memo[key] = PromptEmbeds(embeds, pooled=pooled, family=clip.family, text="")
            else:
                clip.memo[key] = PromptEmbeds(encode_text(clip, ""), family=clip.family, text="")
    return clip.memo[key]


def encode_prompt(clip, text: str, clip_skip: int = 0, long_prompt: str = "truncate", warn=None,
                  text_2: Optional[str] = None, syntax: str = "plain") -> PromptEmbeds:
    """CONDITIONING for ``text``, carrying the empty prompt's conditioning as the default negative.

    ``text_2``: SDXL only, the prompt for the second text encoder (default: ``text``).

    The encoders run with the CLIP's patches (a LoRA) applied and are locked meanwhile
    (``ClipHandle.patched``), so concurrent encodes never see each other's patches."""
    sdxl = getattr(clip, "is_sdxl", False)
    if text_2 and not sdxl:
        raise NodeError("prompt_2 is for SDXL's second text encoder; this CLIP has only one (SD 1.x/2.x)")
    uncond = empty_prompt(clip)
    with clip.patched():
        if sdxl:
            embeds, pooled = encode_text_sdxl(clip, text, text_2, clip_skip, long_prompt, warn, syntax)
            return PromptEmbeds(embeds, pooled=pooled, family=clip.family, text=text, uncond=uncond)
        embeds = encode_text(clip, text, clip_skip, long_prompt, warn, syntax)
    return PromptEmbeds(embeds, family=clip.family, text=text, uncond=uncond)


def concat_conditionings(items: list[PromptEmbeds]) -> PromptEmbeds:
    """One CONDITIONING whose batch rows are ``items``' rows in order (the prompts of jobs sampled as one
    batch). They must come from one CLIP with the same settings: same default negative, length and size."""
    first = items[0]
    for other in items[1:]:
        if (other.uncond is not first.uncond or other.family != first.family or other.size != first.size
                or other.embeds.shape[1:] != first.embeds.shape[1:] or set(other.added) != set(first.added)
                or (other.pooled is None) != (first.pooled is None)):
            raise NodeError("these conditionings cannot be batched: they come from different CLIPs or settings, "
                            "or their prompts encode to different lengths")
    return replace(first, embeds=torch.cat([c.embeds for c in items]),
                   pooled=torch.cat([c.pooled for c in items]) if first.pooled is not None else None,
                   added={k: torch.cat([c.added[k] for c in items]) for k in first.added},
                   text="\n".join(c.text for c in items))


def with_size(conditioning: PromptEmbeds, **size) -> PromptEmbeds:
    """A copy of ``conditioning`` with SDXL micro-conditioning values set (None values are left out)."""
    merged = {**conditioning.size, **{k: v for k, v in size.items() if v is not None}}
    return replace(conditioning, size=merged)


def _check_brackets(params: dict):
    text = params.get("text")
    if params.get("syntax") == "compel" and isinstance(text, str):
        problem = prompt_weights.unbalanced_bracket(text)
        if problem:
            yield "text", f"Compel's brackets do not balance: {problem} (write \\( for a literal bracket)"


@node("CLIPEncode", version=1, space=SpaceRule(("clip", "conditioning")), category="conditioning", outputs={"conditioning": CONDITIONING},
      check=_check_brackets, reference="diffusers StableDiffusionPipeline.encode_prompt / StableDiffusionXLPipeline.encode_prompt")
def clip_encode(
    clip: Clip,
    ctx: RunContext,
    text: Annotated[str, Field(description="the prompt")] = "",
    clip_skip: Annotated[int, Field(ge=0, le=11, description="use the layer this many before the last (diffusers "
                                                            "clip_skip); 0 = last layer (SDXL: the penultimate)")] = 0,
    long_prompt: Annotated[Literal["truncate", "chunk"], Field(description="past 77 tokens: cut (diffusers) or "
                                                                   "encode 75-token windows (A1111/ComfyUI)")] = "truncate",
    prompt_2: Optional[Annotated[str, Field(description="SDXL only: prompt for the second text encoder "
                                                        "(default: text)")]] = None,
    syntax: Annotated[Literal["plain", "compel", "comfy"], Field(
        description="plain: the text as it is; compel: Compel's weighting ((word)1.3, word++, .blend(), .and()); "
                    "comfy: ComfyUI's (word:1.2) weighting and 75-token windows")] = "plain",
):
    """Encode a prompt with the checkpoint's CLIP text encoder(s) (diffusers encode_prompt embeddings).

    SDXL: both encoders' penultimate hidden states concatenated, plus the second encoder's pooled
    embedding; prompt_2 optionally feeds the second encoder. Longer than 77 tokens: "truncate" cuts and
    warns (diffusers' behaviour); "chunk" encodes 75-token windows and concatenates them. The output also
    carries the default negative, which samplers use when no negative conditioning is linked, as diffusers
    does: the empty prompt's embedding, or zeros for SDXL (force_zeros_for_empty_prompt).

    syntax "compel" reads Compel's weighting through the compel library, as a diffusers user passes Compel's
    output to a pipeline (clip_skip 0 or 1; long_prompt as for plain text). syntax "comfy" reads ComfyUI's weighting, "(castle:1.3)" or "(castle)" for 1.1, nested, "\\(" for a bracket,
    and encodes as ComfyUI's CLIPTextEncode does (long_prompt is then ignored: ComfyUI always uses windows)."""
    if not hasattr(clip, "tokenizer"):
        raise NodeError("input 'clip' is not a CLIP from LoadCheckpoint")
    with on_device(ctx, ("text_encoder", clip.text_encoder), ("text_encoder_2", clip.text_encoder_2)):
        return encode_prompt(clip, text, clip_skip, long_prompt, warn=ctx.warn, text_2=prompt_2 or None,
                             syntax=syntax)


def _check_size_params(params: dict):
    for kind in ("original", "target"):
        if f"{kind}_width" not in params or f"{kind}_height" not in params:
            continue  # one comes through a link
        width, height = params[f"{kind}_width"], params[f"{kind}_height"]
        if isinstance(width, int) and isinstance(height, int) and bool(width) != bool(height):
            yield f"{kind}_{'height' if width else 'width'}", (f"set both {kind}_width and {kind}_height, or leave "
                                                              "both 0 for the sampled size")


@node("SDXLSizeConditioning", version=1, space=SpaceRule(("conditioning",)), category="conditioning", outputs={"conditioning": CONDITIONING},
      check=_check_size_params,
      reference="diffusers StableDiffusionXLPipeline original_size / crops_coords_top_left / target_size / "
                "aesthetic_score (SDXL micro-conditioning, add_time_ids)")
def sdxl_size_conditioning(
    conditioning: Conditioning,
    original_width: Annotated[int, Field(ge=0, le=16384, description="0 = the sampled width")] = 0,
    original_height: Annotated[int, Field(ge=0, le=16384, description="0 = the sampled height")] = 0,
    crop_left: Annotated[int, Field(ge=0, le=16384, description="crops_coords_top_left, x")] = 0,
    crop_top: Annotated[int, Field(ge=0, le=16384, description="crops_coords_top_left, y")] = 0,
    target_width: Annotated[int, Field(ge=0, le=16384, description="0 = the sampled width")] = 0,
    target_height: Annotated[int, Field(ge=0, le=16384, description="0 = the sampled height")] = 0,
    aesthetic_score: Optional[Annotated[float, Field(ge=0, le=10, description="SDXL refiner only; unset: 6.0 "
                                                                              "for a positive, 2.5 for a negative")]] = None,
):
    """Set SDXL's size micro-conditioning on a conditioning: the UNet's time ids.

    Without this node the sampler uses diffusers' defaults: original and target size = the sampled size,
    crop (0, 0), and for the refiner aesthetic score 6.0 (positive) / 2.5 (negative). On a negative
    conditioning these are diffusers' negative_original_size / negative_crops_coords_top_left /
    negative_target_size / negative_aesthetic_score; unset values follow the positive side."""
    if conditioning.pooled is None:
        raise NodeError("SDXLSizeConditioning needs an SDXL conditioning (CLIPEncode with an SDXL checkpoint's clip)")
    size = {
        "original_size": (original_height, original_width) if original_width and original_height else None,
        "crop": (crop_top, crop_left) if (crop_top or crop_left) else None,
        "target_size": (target_height, target_width) if target_width and target_height else None,
        "aesthetic_score": aesthetic_score,
    }
    return with_size(conditioning, **size)
