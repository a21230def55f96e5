"""CLIP's byte-pair encoding over the vocabulary open_clip ships (`bpe_simple_vocab_16e6.txt.gz`).

Ours rather than open_clip's SimpleTokenizer for start-up time: importing that module builds a
tokenizer at import and each one reads all 262k lines of the file (~0.25 s each); CLIP uses only the
first 48,894 merges, which is all this reads. Same ids (tests/test_text.py checks them against
transformers' CLIPTokenizer and open_clip's).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import itertools
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2          # CLIP's vocabulary: 256 bytes ×2 (+"</w>"), merges, 2 specials


@functools.lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """GPT-2's reversible bytes -> printable characters map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class BPE:
    """`encode(word) -> ids` for one pre-tokenised word (lower case, no spaces)."""

    def __init__(self, path: str | Path | None = None):
        if path is None:
            (root,) = importlib.util.find_spec("open_clip").submodule_search_locations
            path = Path(root) / "bpe_simple_vocab_16e6.txt.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in itertools.islice(f, 1, NUM_MERGES + 1)]
        chars = list(byte_encoder().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache: dict[str, list[int]] = {}

    def encode(self, word: str) -> list[int]:
        if word not in self.cache:
            chars = "".join(byte_encoder()[b] for b in word.encode("utf-8"))
            self.cache[word] = [self.encoder[p] for p in self.merge(chars)]
        return self.cache[word]

    def merge(self, token: str) -> list[str]:
        """Apply the merges by rank, lowest first, each to every non-overlapping pair left to right."""
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, NUM_MERGES))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word


@functools.lru_cache(maxsize=1)
def clip_bpe() -> BPE:
    return BPE()
