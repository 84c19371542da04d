"""Two-stage SuperBPE (Liu et al. 2025) with the stock `tokenizers` library.

Stage 1 is byte-level BPE over whitespace-aware pretokens, trained to the full vocabulary; its first
merges up to the transition point are kept. Stage 2 continues BPE over a looser pretokenization
whose pretokens join words across single spaces, so new merges form superwords ("of the", " in order
to").

The stock trainer cannot resume from existing merges, so stage 2 trains a fresh BPE over stage-1
token sequences: every stage-1 token is written as one private character, each stage-2 pretoken is
encoded with the stage-1 merges exactly as the final tokenizer will encode it, and the trainer's
merges over those characters translate back into merges of byte-level strings. Two SuperBPE rules
are kept by construction: the stage-2 regexes never produce a pretoken holding ':' followed by a
space, and long pretokens are cut into overlapping windows of at most `max_words` words (stride
max_words - 1, so every pair of neighbouring words is counted once), so no learned token spans more
words. The result is a plain `tokenizer.json`: NFC, Split(stage-2 regex) +
ByteLevel(use_regex=False), BPE with stage-1 then stage-2 merges, ByteLevel decoder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

# name -> (stage-1 regex, stage-2 regex). Every alternative that can hold a newline ends with it,
# runs of spaces end before their last space, and digits are pretokens of their own, so a document
# may be cut at those points without changing its ids (see data_tools.encode_worker.SAFE_CUT); keep
# it so when changing these.
_SB_REST = r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SB_CHUNK = r"(?:[^\s\p{N}:]|:(?=\S))+"  # a ':' inside a superword must not be followed by a space
_KX_REST = r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
PRETOKENIZERS: dict[str, tuple[str, str]] = {
    # GPT-4-like stage 1 (letters with one leading space, digits in threes); stage 2 joins any
    # non-digit, non-space chunks by single spaces, as the paper's stage 2 lets merges cross spaces
    # and punctuation.
    "superbpe-default": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)| ?\p{L}[\p{L}\p{M}]*" + _SB_REST,
        rf" ?{_SB_CHUNK}(?: {_SB_CHUNK})*" + _SB_REST,
    ),
    # K-EXAONE's published regex (llama.cpp pre-type exaone-moe) for stage 2: runs of letters joined
    # by single spaces; stage 1 is the same regex without the joining.
    "k-exaone": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*)+" + _KX_REST,
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+"
        + _KX_REST,
    ),
}
# stage-1 token i is written as chr(_PRIVATE_BASE + i): never whitespace, never a surrogate
_PRIVATE_BASE = 0x20000
_SPACE = "\u0120"  # ByteLevel's stand-in for the space byte
_SUPERWORD = re.compile(r"\S \S")


@dataclass(frozen=True)
class StageSizes:
    vocab_size: int  # final vocabulary, special tokens and the 256 byte tokens included
    transition_point: int  # vocabulary size at which stage 2 starts


def byte_level_tokenizer(
    regex: str, vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: list[str]
) -> Tokenizer:
    """A stock byte-level BPE tokenizer with NFC and Split(regex) before ByteLevel."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def bpe_state(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a BPE tokenizer, merges in rank order."""
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return model["vocab"], merges


def train_stage1(
    texts: Iterable[str],
    regex: str,
    vocab_size: int,
    special_tokens: list[str],
    show_progress: bool = True,
) -> Tokenizer:
    """Ordinary byte-level BPE: the baseline at `vocab_size`, and, cut at the transition point,
    stage 1."""
    tok = byte_level_tokenizer(regex, {}, [], [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def truncate(
    vocab: dict[str, int], merges: list[tuple[str, str]], size: int, num_special: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The first `size` vocabulary entries: specials, byte alphabet, then merge results in training
    order."""
    kept_merges = merges[: size - num_special - len(pre_tokenizers.ByteLevel.alphabet())]
    kept = {t: i for t, i in vocab.items() if i < size}
    missing = [a + b for a, b in kept_merges if a + b not in kept]
    if missing:
        raise RuntimeError(
            f"stage-1 vocabulary is not in merge order (e.g. {missing[0]!r} has id >= {size})"
        )
    return kept, kept_merges


def _windows(
    ids: list[int],
    word_ids: list[int | None],
    starts_word: list[bool],
    chars: list[str],
    max_words: int,
) -> Iterator[str]:
    """Stage-2 training words of one encoded text: each pretoken (or window of it) as a string of
    token characters."""
    n, i = len(ids), 0
    while i < n:
        j = i + 1
        while j < n and word_ids[j] == word_ids[i]:
            j += 1
        if j - i >= 2:  # a single token holds no pair to merge
            bounds = [i] + [k for k in range(i + 1, j) if starts_word[ids[k]]] + [j]
            words = len(bounds) - 1
            for s in range(0, max(words - 1, 1), max_words - 1):
                yield "".join(
                    [chars[x] for x in ids[bounds[s] : bounds[min(s + max_words, words)]]]
                )
        i = j


def stage2_words(
    helper: Tokenizer, texts: Iterable[str], max_words: int, batch: int = 256
) -> Iterator[str]:
    """Space-joined stage-2 training words for batches of texts (`helper`: stage-1 merges, stage-2
    pretokenizer)."""
    vocab_size = helper.get_vocab_size(with_added_tokens=True)
    tokens = [helper.id_to_token(i) or "" for i in range(vocab_size)]
    starts_word = [t.startswith(_SPACE) for t in tokens]
    chars = [chr(_PRIVATE_BASE + i) for i in range(vocab_size)]
    pending: list[str] = []

    def flush() -> str:
        encs = helper.encode_batch(pending, add_special_tokens=False)
        pending.clear()
        return " ".join(
            w for e in encs for w in _windows(e.ids, e.word_ids, starts_word, chars, max_words)
        )

    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            yield flush()
    if pending:
        yield flush()


def train_stage2(
    stage1_vocab: dict[str, int],
    stage1_merges: list[tuple[str, str]],
    texts: Iterable[str],
    regex: str,
    new_tokens: int,
    max_words: int,
    special_tokens: list[str],
    show_progress: bool = True,
) -> list[tuple[str, str]]:
    """Stage-2 merges (byte-level strings, rank order) learned over stage-1 token sequences of
    `texts`."""
    if max_words < 2:
        raise ValueError("max_words must be at least 2 (superwords join at least two words)")
    helper = byte_level_tokenizer(regex, stage1_vocab, stage1_merges, special_tokens)
    helper.encode_special_tokens = True  # special-token text in the corpus is ordinary text
    chars = [chr(_PRIVATE_BASE + i) for i in range(len(stage1_vocab))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Slack: a merge whose byte string already exists in the vocabulary adds no token and is dropped
    # later.
    trainer = trainers.BpeTrainer(
        vocab_size=len(chars) + new_tokens + new_tokens // 20 + 16,
        min_frequency=2,
        initial_alphabet=chars,
        show_progress=show_progress,
    )
    tok.train_from_iterator(stage2_words(helper, texts, max_words), trainer)
    by_char = {chr(_PRIVATE_BASE + i): t for t, i in stage1_vocab.items()}
    decode = lambda s: "".join(by_char[c] for c in s)  # noqa: E731
    return [(decode(a), decode(b)) for a, b in bpe_state(tok)[1]]


def assemble(
    stage1_vocab: dict[str, int],
    stage1_merges: list[tuple[str, str]],
    stage2_merges: list[tuple[str, str]],
    vocab_size: int,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Final (vocab, merges): stage 1, then stage-2 merges that add a new token, until
    `vocab_size`."""
    vocab, merges = dict(stage1_vocab), list(stage1_merges)
    for a, b in stage2_merges:
        if len(vocab) >= vocab_size:
            break
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    return vocab, merges


def is_superword(token: str) -> bool:
    """Whether a byte-level token string spans a space between two non-space characters."""
    text = bytes(BYTE_DECODER[c] for c in token).decode("utf-8", errors="replace")
    return bool(_SUPERWORD.search(text))


def word_count(token: str) -> int:
    text = bytes(BYTE_DECODER[c] for c in token).decode("utf-8", errors="replace")
    return len([w for w in text.split(" ") if w.strip()])


def _byte_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode table, inverted: printable bytes map to themselves, the rest to
    # U+0100 onwards.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


BYTE_DECODER = _byte_decoder()
