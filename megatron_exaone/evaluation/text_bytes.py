"""What each token id stands for in text: how many bytes (the denominator of bits per byte, which
compares models with different tokenizers: SuperBPE and BPE spend different token counts on the same
text) and whether it ends a sentence (where needle-in-a-haystack inserts its needle)."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from megatron_exaone.data.tokenizer import load_tokenizer

_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece-style byte tokens
SENTENCE_END = (".", "!", "?", "\n", "\u3002")  # the last is the ideographic full stop


def sentence_end_tokens(tokenizer_path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """bool [vocab_size]: whether the text of each id ends with a sentence end (trailing spaces
    aside); False for special tokens and ids the tokenizer does not have."""
    tokenizer = load_tokenizer(tokenizer_path)
    ends = np.zeros(vocab_size, dtype=bool)
    for token_id in range(min(vocab_size, tokenizer.get_vocab_size())):
        text = tokenizer.decode([token_id], skip_special_tokens=True)
        ends[token_id] = text.rstrip(" ").endswith(SENTENCE_END)
    return ends


def token_byte_lengths(tokenizer_path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: the UTF-8 bytes each id adds to decoded text; 0 for special tokens and
    for ids the tokenizer does not have (the model's vocabulary is often padded past it).

    Byte-level tokenizers (GPT-2 style, as `exaone-data train-tokenizer` writes) exactly: each
    character of a token's string stands for one byte. Others by decoding each token on its own,
    exact except for tokens that hold part of a character."""
    tokenizer = load_tokenizer(tokenizer_path)
    spec = json.loads(tokenizer.to_str())
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    byte_level = _is_byte_level(spec.get("decoder"))
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for token_id in range(min(vocab_size, tokenizer.get_vocab_size())):
        if token_id in added:
            token = added[token_id]
            lengths[token_id] = 0 if token["special"] else len(token["content"].encode())
            continue
        piece = tokenizer.id_to_token(token_id)
        if piece is None:
            continue
        if byte_level or _BYTE_FALLBACK.match(piece):
            lengths[token_id] = len(piece) if byte_level else 1
        else:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode())
    return lengths


def _is_byte_level(decoder: dict | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(d) for d in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"
