"""Our byte-level BPE run by tiktoken: the same vocabulary and merges, about 3x the speed of HF `tokenizers`
per core (bench/data_prep.py), and the same ids.

tiktoken merges, inside each pre-tokenized word, the adjacent pair whose concatenation has the lowest rank;
HF merges the pair that comes first in its merge list. The two agree when a token's rank is its merge's
position, which holds for tokenizers our trainer writes (ids of merged tokens increase with the merge
list): `convert` checks that and every other setting that changes the ids (pre-tokenizer regex, prefix
space, normalizer, dropout, prefixes), and returns None for anything else, which then keeps HF's encoder.
Identity is tested on varied text and measured on every corpus by the bench; prepare also re-encodes a
spot-check sample with HF and stops on any difference (see encode.py).
"""
from __future__ import annotations

import json

# The GPT-2 pre-tokenizer pattern: what HF's ByteLevel(use_regex=True) splits words with.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte -> the byte (what byte-level vocab strings use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def why_not_convertible(spec: dict) -> str | None:
    """The reason a tokenizer.json cannot be run by tiktoken with identical ids, or None when it can."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r} is not BPE"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"model.{key} is set"
    if model.get("byte_fallback") or model.get("ignore_merges"):
        return "byte_fallback or ignore_merges is set"
    if spec.get("normalizer") is not None:
        return "a normalizer is set"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=True)"
    return None


def convert(tokenizer_json: str):
    """A tiktoken Encoding equal to the HF tokenizer in `tokenizer_json` on ordinary text, or None (tiktoken
    not installed, or a tokenizer it cannot reproduce). Special tokens are left out: our encoders treat a
    special token's text inside a document as text (encode_special_tokens), which is what encode_ordinary does."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tokenizer_json)
    if why_not_convertible(spec) is not None:
        return None
    model = spec["model"]
    specials = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    decode = byte_decoder()
    ranks: dict[bytes, int] = {}
    for text, rank in model["vocab"].items():
        if text in specials:
            continue
        if any(c not in decode for c in text):
            return None  # not a byte-level vocabulary
        ranks[bytes(decode[c] for c in text)] = rank
    previous = -1
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        rank = ranks.get(bytes(decode[c] for c in left + right))
        if rank is None or rank <= previous:
            return None  # a merge's token id is out of merge order: tiktoken would merge differently
        previous = rank
    if len(set(ranks.values())) != len(ranks) or not all(bytes([b]) in ranks for b in range(256)):
        return None
    return tiktoken.Encoding("lmforge-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
