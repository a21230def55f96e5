"""AUTOMATIC1111's prompt syntax: long prompts in chunks and `(word:1.3)` weighting.

`prompt_syntax="a1111"` encodes a prompt as the web UI does (modules/prompt_parser.py
`parse_prompt_attention`, modules/sd_hijack_clip.py `FrozenCLIPEmbedderWithCustomWordsBase`):
- `parse_prompt_attention`: text -> [(fragment, weight)]: `(a)` ×1.1, `[a]` ÷1.1, `(a:1.3)` ×1.3,
  nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` literal; `BREAK` a marker ("BREAK", -1);
  unbalanced brackets are lenient as A1111 (an unclosed opener weighs the rest, a stray closer is
  text) and `unbalanced` says so, for a warning;
- `tokenize_line`: every fragment tokenised on its own, the ids cut into chunks of max_length − 2
  (75 for SD), each [BOS] + chunk + [EOS] padded with EOS; a full chunk moves the text after its last
  comma within 20 tokens to the next chunk; BREAK starts a new chunk;
- `encode_weighted`: every chunk through the text encoder (the model's own padding: tokens after
  the first EOS become the pad id, 0 for SD2), each hidden state × its token's weight, then the chunk
  × (mean before / mean after) (A1111's "Original" emphasis); the chunks concatenated (B, 77·k, D).
Prompts of fewer chunks, and prompts against their negatives (`pad_chunks`), are padded with the
empty prompt's chunk encoding, as A1111 with "Pad prompt/negative prompt" on, so that CFG stays one
batched UNet call. T5 has no 77-token window to chunk: "a1111" is refused for it (`check_syntax`).
"""
from __future__ import annotations

import re
import warnings

import torch

from .text import BOS_ID, EOS_ID

SYNTAXES = ("plain", "a1111")
COMMA_BACKTRACK = 20            # A1111's opts.comma_padding_backtrack default
BREAK = ("BREAK", -1.0)

_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


def check_syntax(prompt_syntax: str, text_encoder_cfg=None) -> str:
    if prompt_syntax not in SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {prompt_syntax!r}")
    if prompt_syntax == "a1111" and text_encoder_cfg is not None and text_encoder_cfg.kind == "t5":
        raise ValueError("prompt_syntax='a1111' (A1111's 75-token chunks and (word:1.3) weights) is for "
                         "CLIP/OpenCLIP text encoders; this model's is T5: use prompt_syntax='plain'")
    return prompt_syntax


def _attention(text: str) -> tuple[list[list], bool]:
    """(A1111's parse_prompt_attention of `text`, whether its brackets were unbalanced)."""
    res, round_brackets, square_brackets, stray = [], [], [], False

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            stray = stray or part in (")", "]") or weight is not None
            for i, piece in enumerate(_BREAK_RE.split(part)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([piece, 1.0])
    unbalanced = stray or bool(round_brackets) or bool(square_brackets)
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0                                     # merge runs of identical weights
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res, unbalanced


def parse_prompt_attention(text: str) -> list[list]:
    """[[fragment, weight], ...] exactly as A1111's `parse_prompt_attention` (BREAK: ["BREAK", -1])."""
    return _attention(text)[0]


def unbalanced(text: str) -> bool:
    """Whether `text` has an unclosed `(`/`[` or a stray `)`/`]`/`:w)` (A1111 reads it leniently)."""
    return _attention(text)[1]


def tokenize_line(fragments: list[list], encode, bos: int, eos: int, comma: int, chunk_length: int = 75,
                  backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """A1111's tokenize_line: (tokens, weights) of each chunk, chunk_length + 2 long; `encode(text)`
    -> BPE ids without start/end tokens."""
    chunks, tokens, weights, last_comma = [], [], [], -1

    def next_chunk():
        nonlocal tokens, weights, last_comma
        pad = chunk_length - len(tokens)
        chunks.append(([bos] + tokens + [eos] * pad + [eos], [1.0] + weights + [1.0] * pad + [1.0]))
        tokens, weights, last_comma = [], [], -1

    for text, weight in fragments:
        if text == BREAK[0] and weight == BREAK[1]:
            next_chunk()
            continue
        for token in encode(text):
            if token == comma:
                last_comma = len(tokens)
            elif (backtrack != 0 and len(tokens) == chunk_length and last_comma != -1
                  and len(tokens) - last_comma <= backtrack):
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def warn_unbalanced(prompts: list[str], stacklevel: int = 3) -> None:
    bad = [i for i, p in enumerate(prompts) if unbalanced(p)]
    if bad:
        parts = "; ".join(f"prompt {i} ({prompts[i][:40]!r})" for i in bad)
        warnings.warn(f"unbalanced brackets, read leniently as A1111 does (an unclosed ( or [ weighs the "
                      f"rest of the prompt, a stray ) or ] is text; write \\( for a literal one): {parts}",
                      stacklevel=stacklevel)


def encode_weighted(encoder, prompts: list[str], device) -> torch.Tensor:
    """Context (B, max_length·k, D) of `prompts` by A1111's chunking and "Original" emphasis; `encoder`
    a CLIP/OpenCLIP text encoder of ldm/text.py (its tokenizer, padding and layer)."""
    tok = encoder.tokenizer
    warn_unbalanced(prompts, stacklevel=5)   # past encode_prompt and its no_grad
    (comma,), bos, eos = tok.encode(","), BOS_ID, EOS_ID
    unique = list(dict.fromkeys(prompts))
    lines = [tokenize_line(parse_prompt_attention(p), tok.encode, bos, eos, comma, tok.max_length - 2)
             for p in unique]
    k = max(len(chunks) for chunks in lines)
    empty = tokenize_line([["", 1.0]], tok.encode, bos, eos, comma, tok.max_length - 2)[0]
    rows = [c for chunks in lines for c in chunks + [empty] * (k - len(chunks))]
    ids = torch.tensor([t for t, _ in rows])                                       # (U·k, L)
    after_end = torch.arange(ids.shape[1]) > (ids == eos).int().argmax(1, keepdim=True)
    ids = ids.masked_fill(after_end, tok.pad_id)          # the model's own padding past the first EOS
    z = encoder(ids.to(device))                                                    # (U·k, L, D)
    w = torch.tensor([m for _, m in rows], device=z.device, dtype=z.dtype)[..., None]
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * w
    z = z * (original_mean / z.mean(dim=(1, 2), keepdim=True))
    z = z.reshape(len(unique), k * z.shape[1], z.shape[2])                       # (U, L·k, D)
    return z[[unique.index(p) for p in prompts]]


def pad_chunks(empty_fn, *contexts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """`contexts` (B_i, L_i, D) made as long as the longest by appending the empty prompt's chunk
    encoding `empty_fn()` (1, L_chunk, D), A1111's pad_cond; None passes through."""
    longest = max(c.shape[1] for c in contexts if c is not None)
    if all(c is None or c.shape[1] == longest for c in contexts):
        return contexts
    empty = empty_fn()

    def pad(c):
        if c is None or c.shape[1] == longest:
            return c
        repeats = (longest - c.shape[1]) // empty.shape[1]
        return torch.cat([c, empty.repeat(c.shape[0], repeats, 1)], dim=1)
    return tuple(pad(c) for c in contexts)
