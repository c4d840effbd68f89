"""CLIPEncode and the CONDITIONING value: prompt embeddings as diffusers' ``encode_prompt`` makes them.

A CONDITIONING carries what the UNet needs besides the latents for one side of classifier-free guidance:

- ``embeds``: ``encoder_hidden_states`` (B, 77·k, D);
- ``pooled`` and ``added``: extra per-sample UNet conditioning (SDXL's pooled text embeds and time ids,
  IP-Adapter image embeds go here later; the sampler batches them like ``embeds``);
- ``uncond``: the empty prompt's conditioning from the same CLIP. A sampler with no negative linked uses it,
  which is what diffusers does when ``negative_prompt`` is None (it encodes ``""``). Carrying it here keeps
  samplers free of a CLIP input; it is computed once per CLIP and shared.

Long prompts: ``long_prompt="truncate"`` (default) cuts at 77 tokens and warns with the removed text, exactly
as diffusers does; ``"chunk"`` encodes 75-token windows (each wrapped in BOS/EOS and padded to 77) and
concatenates them along the sequence axis, as A1111/ComfyUI do. For prompts of 75 tokens or fewer both
give the same embedding. Samplers pad the shorter of positive/negative with empty-prompt chunks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

import torch
from pydantic import Field

from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph.node import node
from nodegraph.serialize import disk_cacheable
from nodegraph.sockets import CONDITIONING, Clip


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
    device = encoder.device
    mask = attention.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
    with torch.inference_mode():
        embeds = _hidden_states(encoder, ids.to(device), mask, clip_skip)
    return embeds.to(dtype=encoder.dtype, device=device).clone()  # a normal tensor outside inference mode


def encode_text(clip, text: str, clip_skip: int = 0, long_prompt: str = "truncate",
                warn=None) -> torch.Tensor:
    """Prompt -> (1, 77*k, D) embeddings, the arithmetic of diffusers' ``encode_prompt``."""
    tokenizer = clip.tokenizer
    max_length = tokenizer.model_max_length
    if long_prompt == "chunk":
        return _encode_chunks(clip, text, clip_skip)
    inputs = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    untruncated = tokenizer(text, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] >= inputs.input_ids.shape[-1] and not torch.equal(inputs.input_ids, untruncated):
        removed = tokenizer.batch_decode(untruncated[:, max_length - 1:-1])[0]
        if warn is not None:
            warn(f"the prompt is longer than CLIP's {max_length} tokens and was truncated; removed: {removed!r} "
                 "(set long_prompt='chunk' to keep it)")
    return _encode_ids(clip, inputs.input_ids, inputs.attention_mask, clip_skip)


def _encode_chunks(clip, text: str, clip_skip: int) -> torch.Tensor:
    tokenizer = clip.tokenizer
    window = tokenizer.model_max_length - 2
    ids = tokenizer(text, add_special_tokens=False).input_ids
    chunks = [ids[i:i + window] for i in range(0, len(ids), window)] or [[]]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, masks = [], []
    for chunk in chunks:
        row = [bos] + chunk + [eos]
        masks.append([1] * len(row) + [0] * (window + 2 - len(row)))
        rows.append(row + [pad] * (window + 2 - len(row)))
    embeds = _encode_ids(clip, torch.tensor(rows), torch.tensor(masks), clip_skip)  # (k, 77, D)
    return embeds.reshape(1, -1, embeds.shape[-1])


def empty_prompt(clip) -> PromptEmbeds:
    """The embedding of "" (diffusers' negative when none is given), computed once per CLIP."""
    key = ("", str(clip.text_encoder.dtype), str(clip.text_encoder.device))
    if key not in clip.memo:
        clip.memo[key] = PromptEmbeds(encode_text(clip, ""), family=clip.family, text="")
    return clip.memo[key]


def encode_prompt(clip, text: str, clip_skip: int = 0, long_prompt: str = "truncate", warn=None) -> PromptEmbeds:
    """CONDITIONING for ``text``, carrying the empty prompt's conditioning as the default negative."""
    embeds = encode_text(clip, text, clip_skip, long_prompt, warn)
    return PromptEmbeds(embeds, family=clip.family, text=text, uncond=empty_prompt(clip))


@node("CLIPEncode", version=1, category="conditioning", outputs={"conditioning": CONDITIONING},
      reference="diffusers StableDiffusionPipeline.encode_prompt")
def clip_encode(
    clip: Clip,
    ctx: RunContext,
    text: str = "",
    clip_skip: Annotated[int, Field(ge=0, le=11, description="use the layer this many before the last (diffusers "
                                                            "clip_skip); 0 = last layer")] = 0,
    long_prompt: Literal["truncate", "chunk"] = "truncate",
):
    """Encode a prompt with the checkpoint's CLIP text encoder (diffusers encode_prompt embeddings).

    Longer than 77 tokens: "truncate" cuts and warns (diffusers' behaviour); "chunk" encodes 75-token
    windows and concatenates them. The output also carries the empty prompt's embedding, which samplers
    use as the negative when no negative conditioning is linked (as diffusers does)."""
    if not hasattr(clip, "tokenizer"):
        raise NodeError("input 'clip' is not a CLIP from LoadCheckpoint")
    return encode_prompt(clip, text, clip_skip, long_prompt, warn=ctx.warn)
