"""ComfyUI's prompt weighting (CLIPEncode syntax "comfy") against a plain re-implementation of what ComfyUI's
``comfy/sd1_clip.py`` does: its bracket parser, its packing of tokenized parts into 77-token windows, and its
weighting of each token's hidden state against the empty prompt's, run on the tiny models' own text encoders.

The pad token: ComfyUI pads CLIP-L with EOS and the OpenCLIP encoders (SD 2.x, SDXL's second) with 0, which is
what the real checkpoints' tokenizers name as their pad token; the reference takes the tokenizer's."""
from __future__ import annotations

import pytest
import torch

from nodegraph.errors import NodeError
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.prompt_weights import weighted_parts


# ------------------------------------------------------------------------- the reference, as ComfyUI computes

def comfy_parse(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """sd1_clip.token_weights over parse_parentheses, escapes handled by the caller."""
    groups, buf, level = [], "", 0
    for ch in text:
        if ch == "(":
            if level == 0:
                if buf:
                    groups.append(buf)
                buf = "("
            else:
                buf += ch
            level += 1
        elif ch == ")":
            level -= 1
            if level == 0:
                groups.append(buf + ")")
                buf = ""
            else:
                buf += ch
        else:
            buf += ch
    if buf:
        groups.append(buf)
    result = []
    for g in groups:
        if len(g) >= 2 and g.startswith("(") and g.endswith(")"):
            body, w = g[1:-1], weight * 1.1
            at = body.rfind(":")
            if at > 0:
                try:
                    w = float(body[at + 1:])
                    body = body[:at]
                except ValueError:
                    pass
            result.extend(comfy_parse(body, w))
        else:
            result.append((g, weight))
    return result


def comfy_tokens(tokenizer, text: str) -> list[list[tuple[int, float]]]:
    """SDTokenizer.tokenize_with_weights (no embeddings): 77-token rows of (token, weight)."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    escaped = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    groups = []
    for segment, weight in comfy_parse(escaped):
        segment = segment.replace("\0\1", ")").replace("\0\2", "(")
        if segment:
            groups.append([(t, weight) for t in tokenizer(segment)["input_ids"][1:-1]])
    rows, row = [], [(start, 1.0)]
    rows.append(row)
    for group in groups:
        large = len(group) >= 8
        while group:
            if len(group) + len(row) > 77 - 1:
                remaining = 77 - len(row) - 1
                if large:
                    row.extend(group[:remaining])
                    row.append((end, 1.0))
                    group = group[remaining:]
                else:
                    row.append((end, 1.0))
                    row.extend([(pad, 1.0)] * remaining)
                row = [(start, 1.0)]
                rows.append(row)
            else:
                row.extend(group)
                group = []
    row.append((end, 1.0))
    row.extend([(pad, 1.0)] * (77 - len(row)))
    return rows


def comfy_encode(encoder, tokenizer, text: str, hidden_of) -> tuple[torch.Tensor, torch.Tensor]:
    """ClipTokenWeightEncoder.encode_token_weights: all rows plus (when weighted) the empty row in one batch."""
    rows = comfy_tokens(tokenizer, text)
    weighted = any(w != 1.0 for row in rows for _, w in row)
    batch = [[t for t, _ in row] for row in rows]
    if weighted:
        batch.append([tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * 75)
    with torch.no_grad():
        hidden, pooled = hidden_of(encoder, torch.tensor(batch))
    out = []
    for k, row in enumerate(rows):
        z = hidden[k].clone()
        if weighted:
            for j, (_, w) in enumerate(row):
                if w != 1.0:
                    z[j] = (z[j] - hidden[-1][j]) * w + hidden[-1][j]
        out.append(z)
    return torch.cat(out).unsqueeze(0), (pooled[0:1] if pooled is not None else None)


def sd1_hidden(encoder, ids):
    return encoder(ids).last_hidden_state, None


def sdxl_hidden(encoder, ids):
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], (out.text_embeds if hasattr(out, "text_embeds") else None)


PROMPTS = [
    "a (red:1.5) castle, ((tall towers)), (moat:0.5) at dusk",
    "a stone castle on a hill",  # no weights: no empty row, plain windows
    "\\(not weighted\\) (nested (inner:1.3) outer) (broken:x) (unbalanced",
    ", ".join(["(banner:1.2) flags"] * 14) + " (" + "a very long weighted part of many tokens " * 2 + ":0.8)",
]


def test_the_parser_reads_comfyui_syntax():
    assert weighted_parts("a (red:1.5) ((castle)) \\(x\\)") == [
        ("a ", 1.0), ("red", 1.5), (" ", 1.0), ("castle", 1.1 * 1.1), (" (x)", 1.0)]
    for text in PROMPTS:
        escaped = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
        expected = [(t.replace("\0\1", ")").replace("\0\2", "("), w) for t, w in comfy_parse(escaped)]
        assert weighted_parts(text) == expected


@pytest.mark.parametrize("text", PROMPTS)
def test_sd1_weighted_prompts_match_comfyui(sd, text):
    _, clip, _ = sd
    ours = encode_prompt(clip, text, syntax="comfy").embeds
    reference, _ = comfy_encode(clip.text_encoder, clip.tokenizer, text, sd1_hidden)
    assert ours.shape == reference.shape
    assert torch.equal(ours, reference)


def test_long_prompts_fill_several_windows_and_a_weight_moves_only_its_tokens(sd):
    from nodegraph.nodes.prompt_weights import token_windows

    _, clip, _ = sd
    long = encode_prompt(clip, PROMPTS[3], syntax="comfy").embeds
    assert long.shape[1] > 77 and long.shape[1] % 77 == 0
    ids, weights = token_windows(clip.tokenizer, "a (red:1.5) castle")
    plain_ids, plain_weights = token_windows(clip.tokenizer, "a red castle")
    assert torch.equal(ids, plain_ids) and (plain_weights == 1).all() and (weights == 1.5).sum() > 0
    weighted = encode_prompt(clip, "a (red:1.5) castle", syntax="comfy").embeds[0]
    plain = encode_prompt(clip, "a red castle", syntax="comfy").embeds[0]
    moved = (weighted != plain).any(dim=-1)
    assert torch.equal(moved, weights[0] != 1)


@pytest.mark.parametrize("text", PROMPTS[:3])
def test_sdxl_weighted_prompts_match_comfyui(xl, text):
    _, clip, _ = xl
    ours = encode_prompt(clip, text, syntax="comfy")
    l_hidden, _ = comfy_encode(clip.text_encoder, clip.tokenizer, text, sdxl_hidden)
    g_hidden, pooled = comfy_encode(clip.text_encoder_2, clip.tokenizer_2, text, sdxl_hidden)
    cut = min(l_hidden.shape[1], g_hidden.shape[1])
    reference = torch.cat([l_hidden[:, :cut], g_hidden[:, :cut]], dim=-1)
    assert torch.equal(ours.embeds, reference)
    assert torch.equal(ours.pooled, pooled)


def test_textual_inversion_embeddings_are_refused_clearly(sd):
    _, clip, _ = sd
    with pytest.raises(NodeError, match="embedding"):
        encode_prompt(clip, "a castle, embedding:easynegative", syntax="comfy")
