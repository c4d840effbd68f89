"""ComfyUI's prompt weighting, ``(word:1.2)``, as its CLIP text encoding computes it (docs/design.md §4.1).

Parsing: a bracketed part ``(...)`` multiplies the weight around it by 1.1, or sets it to the number after its
last colon (``(castle:1.3)``); brackets nest; ``\\(`` and ``\\)`` are literal brackets; an unbalanced bracket is
not an error (ComfyUI reads it leniently, and so do we).

Tokens: each weighted part is tokenized on its own (no BOS/EOS) and the parts are packed into windows of 77
(BOS, up to 75 tokens, EOS, padding). A part that does not fit in what is left of a window moves whole to the
next window, unless it has 8 tokens or more, which are split at the window's end.

Weights: each window is encoded as it is; when any weight is not 1, the window of the empty prompt
(BOS, EOS, padding) is encoded too, and every token position j of weight w becomes
``empty[j] + w * (hidden[j] - empty[j])``: the weight scales the token's distance from the empty prompt.
"""
from __future__ import annotations

from nodegraph.errors import NodeError
from nodegraph.lazy import lazy

from ._memory import compute_device

torch = lazy("torch")

WINDOW = 77
LONG_PART = 8  # tokens: parts this long may be split across windows
_OPEN, _CLOSE = "\0\2", "\0\1"  # escaped brackets, out of the parser's way


def pad_token(tokenizer) -> int:
    """The id windows are padded with: the tokenizer's pad token (CLIP-L's is EOS, OpenCLIP's 0), else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _top_level_parts(text: str) -> list[str]:
    """``text`` cut into plain runs and outermost bracketed groups (brackets kept)."""
    parts, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                parts.append(current)
                current = ""
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            current += char
            if depth == 0:
                parts.append(current)
                current = ""
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def _weighted(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for part in _top_level_parts(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner, inner_weight = part[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight, inner = float(inner[colon + 1:]), inner[:colon]
                except ValueError:
                    pass
            out += _weighted(inner, inner_weight)
        else:
            out.append((part, weight))
    return out


def weighted_parts(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) parts, in order."""
    escaped = text.replace("\\)", _CLOSE).replace("\\(", _OPEN)
    return [(part.replace(_CLOSE, ")").replace(_OPEN, "("), weight) for part, weight in _weighted(escaped, 1.0)]


def token_windows(tokenizer, text: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(k, 77) token ids and (k, 77) weights for ``text``, packed as described above."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = pad_token(tokenizer)
    if "embedding:" in text:
        raise NodeError("textual inversion embeddings ('embedding:name') are not supported")
    groups = []
    for part, weight in weighted_parts(text):
        if part:
            ids = tokenizer(part, add_special_tokens=False).input_ids
            if ids:
                groups.append([(i, weight) for i in ids])
    windows, window = [], [(bos, 1.0)]
    for group in groups:
        long_part = len(group) >= LONG_PART
        while group:
            room = WINDOW - 1 - len(window)  # leaves a place for EOS
            if len(group) <= room:
                window += group
                break
            if long_part:
                window += group[:room]
                group = group[room:]
                window.append((eos, 1.0))
            else:
                window += [(eos, 1.0)] + [(pad, 1.0)] * room
            windows.append(window)
            window = [(bos, 1.0)]
    window.append((eos, 1.0))
    windows.append(window + [(pad, 1.0)] * (WINDOW - len(window)))
    ids = torch.tensor([[t for t, _ in w] for w in windows])
    weights = torch.tensor([[float(w) for _, w in row] for row in windows], dtype=torch.float64)
    return ids, weights


def with_empty_window(tokenizer, text: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``token_windows``, plus, when any weight is not 1, the empty prompt's window (BOS, EOS, padding) as a
    last row: encoded in the same batch as the prompt's windows, as ComfyUI does (a batch of another size
    may round differently)."""
    ids, weights = token_windows(tokenizer, text)
    if (weights != 1.0).any():
        pad = pad_token(tokenizer)
        empty = torch.tensor([[tokenizer.bos_token_id, tokenizer.eos_token_id] + [pad] * (WINDOW - 2)])
        ids = torch.cat([ids, empty])
    return ids, weights


def apply_weights(hidden: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """The prompt's rows of ``hidden`` (k or k + 1 rows, from ``with_empty_window``) with each token of weight
    w moved to ``empty + w * (hidden - empty)``, the empty prompt's row being the last."""
    rows = weights.shape[0]
    if hidden.shape[0] == rows:
        return hidden
    prompt, empty = hidden[:rows], hidden[rows]
    w = weights.to(hidden.device).unsqueeze(-1)
    return torch.where(w != 1.0, (prompt - empty) * w.to(hidden.dtype) + empty, prompt)


# ---------------------------------------------------------------------------------------------- Compel

def unbalanced_bracket(text: str) -> str | None:
    """A problem with Compel's brackets in ``text`` (outside ``\\(`` / ``\\)`` escapes), or None."""
    depth = 0
    for i, char in enumerate(text):
        if i and text[i - 1] == "\\":
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return f"')' at character {i + 1} closes no bracket"
    return f"{depth} '(' not closed" if depth else None


def compel_embeds(clip, text: str, clip_skip: int, long_prompt: str) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Compel's conditioning for ``text`` (``(word)1.3``, ``word++``, ``.blend()``, ``.and()``) on this CLIP's
    encoders, as a diffusers user feeds it to a pipeline's ``prompt_embeds`` / ``pooled_prompt_embeds``: SD 1.x/2.x
    the last (clip_skip 1: the penultimate, normalized) hidden states, SDXL both encoders' penultimate ones and the
    second's pooled embedding. Long prompts: cut at 77 tokens, or with "chunk" Compel's 75-token windows."""
    from compel import Compel, ReturnedEmbeddingsType

    sdxl = getattr(clip, "is_sdxl", False)
    if clip_skip > (0 if sdxl else 1):
        raise NodeError(f"syntax 'compel' takes clip_skip {'0' if sdxl else '0 or 1'} with this CLIP")
    key = ("compel", long_prompt, clip_skip)
    compel = clip.memo.get(key)
    if compel is None:
        pairs = [(t, e) for t, e in clip.encoders] if sdxl else [(clip.tokenizer, clip.text_encoder)]
        kind = (ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED if sdxl else
                ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED if clip_skip else
                ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED)
        encoder = pairs[-1][1]
        compel = clip.memo[key] = Compel(
            tokenizer=[t for t, _ in pairs] if sdxl else pairs[0][0],
            text_encoder=[e for _, e in pairs] if sdxl else pairs[0][1],
            returned_embeddings_type=kind, requires_pooled=[i == len(pairs) - 1 for i in range(len(pairs))] if sdxl
            else False, truncate_long_prompts=long_prompt == "truncate", device=str(compute_device(encoder)),
            dtype_for_device_getter=lambda device: encoder.dtype)
    problem = unbalanced_bracket(text)
    if problem:
        raise NodeError(f"the prompt's brackets do not balance: {problem}")
    with torch.inference_mode():
        out = compel(text)
    embeds, pooled = out if sdxl else (out, None)
    return embeds.clone(), (pooled.clone() if pooled is not None else None)
