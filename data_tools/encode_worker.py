"""Worker side of `exaone-data tokenize`: parse a batch of records, encode it in one call, return
flat token arrays.

Kept free of torch and of the training library so that spawned worker processes start quickly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import unicodedata
from dataclasses import dataclass
from itertools import chain

import numpy as np
from tokenizers import Tokenizer, normalizers

from data_tools.readers import BadRecord, Record, parse_record
from megatron_exaone.lifetime import die_with_parent

# cut documents per worker whose first pieces are also encoded whole, to check the cuts
VERIFY_SPLITS = 8
VERIFY_PIECES = 16  # pieces encoded whole in one such check
# Longest text encoded in one call. The regex engine of `tokenizers` (Oniguruma) panics when one
# match takes more than its 10,000,000 backtracking steps ("retry-limit-in-match over"), about one
# step per character: a pretoken of ~9.9 million characters (a run of spaces; letters joined by
# single spaces under K-EXAONE's regex) breaks it, 20 MB of SuperBPE superwords do not. A piece no
# longer than this cannot hold such a pretoken.
MAX_PIECE_CHARS = 4_000_000

# What the tokenizers' regexes call \s (Unicode White_Space; Python's \s also holds U+001C..U+001F).
_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACE_NOT_NEWLINE = _SPACE.replace("\n", "").replace("\r", "")
# Points no pretoken crosses under the byte-level regexes of the Llama-3/GPT-4 family (K-EXAONE's
# and SuperBPE's included), so that encoding the two sides apart gives the ids of the whole (see
# safe_split; GPT-2's regex, without a line-break alternative, fails the first rule and the
# per-worker check). Zero-width, and looking ahead only for characters that must be present, so a
# search that stops early only misses cuts.
SAFE_CUT = re.compile(
    # after a line break, before a non-space: a pretoken holding a line break ends with it
    r"(?<=\n)(?=\S)"
    # before the last space of a run: `\s+(?!\S)` ends there
    rf"|(?<=[{_SPACE}])(?=[{_SPACE_NOT_NEWLINE}]\S)"
    r"|(?<=[A-Za-z])(?=[0-9])"  # letter | digit: digits form pretokens of their own
    # digit | ASCII non-digit (a non-ASCII \p{N} such as "²" may join)
    r"|(?<=[0-9])(?=[\x00-\x2f\x3a-\x7f])"
)


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer_path: str
    text_field: str
    eod_id: int | None  # appended after every document; None: nothing appended
    dtype: str
    split_chars: int  # documents longer than this are cut at safe points; 0: never cut
    threads: int  # encoder threads in this worker; 0: the library default (all cores)


@dataclass
class EncodedBatch:
    tokens: np.ndarray
    lengths: np.ndarray  # tokens per document, EOD included
    bad: list[tuple[int, int, str]]  # (input index, line, problem)
    text_bytes: int
    empty: int


def safe_split(text: str, target_chars: int) -> list[str]:
    """Cut `text` into pieces of about `target_chars`, only at SAFE_CUT points, and where possible
    none longer than MAX_PIECE_CHARS.

    Every alternative of the supported pretokenizer regexes that can hold a line break ends with it,
    runs of spaces are split before their last space when a non-space follows, and digits are
    pretokens of their own; NFC composes nothing across these points (both sides are starters that
    never combine). So encoding the pieces and concatenating their ids gives the ids of the whole
    text (checked per worker by `_verify_cuts`, which stops a tokenizer whose pretokenizer differs).
    Text without such a point stays whole.
    """
    if target_chars <= 0 or len(text) <= target_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > target_chars:
        cut = _next_cut(text, start, target_chars)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _next_cut(text: str, start: int, target_chars: int) -> int | None:
    """The first cut at least `target_chars` after `start` that keeps the piece within
    MAX_PIECE_CHARS, else the last cut before that (a shorter piece beats one too long to encode);
    None if there is none."""
    found = SAFE_CUT.search(text, start + target_chars, start + MAX_PIECE_CHARS)
    if found:
        return found.start()
    earlier = [m.start() for m in SAFE_CUT.finditer(text, start + 1, start + target_chars)]
    return earlier[-1] if earlier else None


def document_pieces(text: str, split_chars: int) -> list[str]:
    """`text` cut for encoding (`safe_split`); BadRecord if a piece stays too long for the
    tokenizer's regex engine."""
    pieces = safe_split(text, min(split_chars, MAX_PIECE_CHARS))
    longest = max(len(p) for p in pieces)
    if longest <= MAX_PIECE_CHARS:
        return pieces
    if split_chars <= 0:
        raise BadRecord(
            f"document of {len(text):,} characters is longer than the {MAX_PIECE_CHARS:,} "
            "characters the tokenizer's regex engine can encode at once, and --split-chars 0 "
            "keeps documents whole; split it into smaller documents"
        )
    raise BadRecord(
        f"document of {len(text):,} characters has a stretch of {longest:,} characters with no "
        "point where it can be cut without changing its tokens (a line break or a run of spaces "
        "before a non-space, the edge of a number), more than the tokenizer's regex engine can "
        f"encode at once ({MAX_PIECE_CHARS:,} characters); split it into smaller documents, for "
        "example at paragraphs"
    )


# U+1DF6 (Unicode 10, combining class 232) moves before U+0301 (230) only under Unicode 10+ tables.
_UNICODE10_PROBE = "a\u1df6\u0301"


def without_nfc(tok: Tokenizer) -> Tokenizer | None:
    """A copy of `tok` minus its NFC normalizer, for text that Python's `unicodedata` finds already
    NFC.

    Skipping the normalizer saves about a tenth of the encoding time and gives the same ids when the
    tokenizer's NFC tables are no newer than Python's: by Unicode's normalization stability policy,
    text that is NFC under newer tables is left unchanged by NFC under older ones (tokenizers 0.2x
    use Unicode 9.0; Python >= 3.10 has 13.0+). The probe checks the tables' age, so a future
    tokenizers with newer tables simply gets no copy.
    """
    spec = json.loads(tok.to_str())
    tables_newer = normalizers.NFC().normalize_str(_UNICODE10_PROBE) != _UNICODE10_PROBE
    if spec.get("normalizer") != {"type": "NFC"} or tables_newer:
        return None
    spec["normalizer"] = None
    copy = Tokenizer.from_str(json.dumps(spec))
    copy.encode_special_tokens = tok.encode_special_tokens
    return copy


_worker: dict = {}


def init_worker(settings: EncodeSettings) -> None:
    """Load the tokenizer once per process (the pool initializer; called directly for in-process
    runs)."""
    if settings.threads:
        # Read by the encoder's thread pool when it first starts, which is after this point in a
        # fresh worker.
        os.environ["RAYON_NUM_THREADS"] = str(settings.threads)
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if settings.threads > 1 else "false"
    tok = Tokenizer.from_file(settings.tokenizer_path)
    # "<|endoftext|>" written in a document is text, not a control token
    tok.encode_special_tokens = True
    _worker.update(
        settings=settings, tokenizer=tok, nfc_free=without_nfc(tok), verify_left=VERIFY_SPLITS
    )


def init_pool_worker(command_pid: int, settings: EncodeSettings) -> None:
    """Pool initializer: the worker dies with the command that started it (pid `command_pid`), even
    by SIGKILL, and leaves SIGUSR1 to that command: Slurm sends it to every process of a job step (a
    time-limit warning), and the trainer that prepares its sample data asks for a checkpoint on it,
    not for dead workers."""
    die_with_parent(command_pid)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    init_worker(settings)


def _encode(pieces: list[str]) -> list[list[int]]:
    """Ids of each piece; pieces already in NFC skip the tokenizer's normalizer when that is
    provably a no-op."""
    tok, fast = _worker["tokenizer"], _worker["nfc_free"]
    if fast is None:
        return [e.ids for e in tok.encode_batch_fast(pieces, add_special_tokens=False)]
    is_nfc = [unicodedata.is_normalized("NFC", p) for p in pieces]
    done = iter(
        fast.encode_batch_fast([p for p, ok in zip(pieces, is_nfc) if ok], add_special_tokens=False)
    )
    rest = iter(
        tok.encode_batch_fast(
            [p for p, ok in zip(pieces, is_nfc) if not ok], add_special_tokens=False
        )
    )
    return [next(done if ok else rest).ids for ok in is_nfc]


def _verify_cuts(pieces: list[str], ids: list[list[int]]) -> None:
    """Encode the first pieces of a cut document whole (a few per worker): the ids must be the
    pieces' ids."""
    if _worker["verify_left"] <= 0:
        return
    count, chars = 1, len(pieces[0])
    while count < min(len(pieces), VERIFY_PIECES) and chars + len(pieces[count]) <= MAX_PIECE_CHARS:
        chars += len(pieces[count])
        count += 1
    if count < 2:
        return
    _worker["verify_left"] -= 1
    whole = _worker["tokenizer"].encode("".join(pieces[:count]), add_special_tokens=False).ids
    if whole != list(chain.from_iterable(ids[:count])):
        raise RuntimeError(
            "cutting long documents at line breaks, space runs or digits changes this tokenizer's "
            "ids (its pretokenizer lets a token cross such a point or adds a prefix to every "
            "input); rerun with --split-chars 0"
        )


def encode_records(records: list[Record]) -> EncodedBatch:
    """Tokens of every usable record (EOD appended), in order; unusable records are listed in
    `bad`."""
    settings: EncodeSettings = _worker["settings"]
    bad: list[tuple[int, int, str]] = []
    docs: list[list[str]] = []  # the pieces of each document
    text_bytes = 0
    for source, line, payload in records:
        try:
            text, size, _ = parse_record(payload, settings.text_field)
            docs.append(document_pieces(text, settings.split_chars))
        except BadRecord as e:
            bad.append((source, line, str(e)))
            continue
        text_bytes += size
    encoded = iter(_encode(list(chain.from_iterable(docs))))
    flat: list[int] = []
    lengths = np.zeros(len(docs), np.int64)
    for d, pieces in enumerate(docs):
        ids = [next(encoded) for _ in pieces]
        if len(pieces) > 1:
            _verify_cuts(pieces, ids)
        start = len(flat)
        for piece_ids in ids:
            flat += piece_ids
        # Megatron's rule: a document that encodes to nothing gets no end-of-document token either
        if settings.eod_id is not None and len(flat) > start:
            flat.append(settings.eod_id)
        lengths[d] = len(flat) - start
    return EncodedBatch(
        np.array(flat, dtype=settings.dtype),
        lengths,
        bad,
        text_bytes,
        empty=sum(1 for pieces in docs if not pieces[0]),
    )
