"""Worker side of `exaone-data tokenize`: parse a batch of records, encode it in one call, return flat token arrays.

Kept free of torch and of the training library so that spawned worker processes start quickly.
"""

from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, normalizers

from data_tools.readers import BadRecord, Record, parse_record

VERIFY_SPLITS = 8  # cut documents per worker also encoded whole, to check that cutting keeps this tokenizer's ids


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
    """Cut `text` into pieces of about `target_chars`, only right after a newline followed by a non-space character.

    Such a point is a pretoken boundary for byte-level regexes of the GPT-2/Llama-3/K-EXAONE families (no pretoken
    starts with a newline, and one that holds a newline ends with it), and NFC composes nothing across a newline,
    so encoding the pieces and concatenating the ids gives the ids of the whole text. Text without such a point
    stays whole.
    """
    if target_chars <= 0 or len(text) <= target_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > target_chars:
        cut = text.find("\n", start + target_chars - 1)
        while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1 or cut + 1 >= len(text):
            break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


# U+1DF6 (Unicode 10, combining class 232) moves before U+0301 (230) only under Unicode 10+ tables.
_UNICODE10_PROBE = "a\u1df6\u0301"


def without_nfc(tok: Tokenizer) -> Tokenizer | None:
    """A copy of `tok` minus its NFC normalizer, for text that Python's `unicodedata` finds already NFC.

    Skipping the normalizer saves about a tenth of the encoding time and gives the same ids when the tokenizer's
    NFC tables are no newer than Python's: by Unicode's normalization stability policy, text that is NFC under
    newer tables is left unchanged by NFC under older ones (tokenizers 0.2x use Unicode 9.0; Python >= 3.10 has
    13.0+). The probe checks the tables' age, so a future tokenizers with newer tables simply gets no copy.
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
    """Load the tokenizer once per process (the pool initializer; called directly for in-process runs)."""
    if settings.threads:
        # Read by the encoder's thread pool when it first starts, which is after this point in a fresh worker.
        os.environ["RAYON_NUM_THREADS"] = str(settings.threads)
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if settings.threads > 1 else "false"
    tok = Tokenizer.from_file(settings.tokenizer_path)
    tok.encode_special_tokens = True  # "<|endoftext|>" written in a document is text, not a control token
    _worker.update(settings=settings, tokenizer=tok, nfc_free=without_nfc(tok), verify_left=VERIFY_SPLITS)


def _encode(pieces: list[str]) -> list[list[int]]:
    """Ids of each piece; pieces already in NFC skip the tokenizer's normalizer when that is provably a no-op."""
    tok, fast = _worker["tokenizer"], _worker["nfc_free"]
    if fast is None:
        return [e.ids for e in tok.encode_batch_fast(pieces, add_special_tokens=False)]
    is_nfc = [unicodedata.is_normalized("NFC", p) for p in pieces]
    done = iter(fast.encode_batch_fast([p for p, ok in zip(pieces, is_nfc) if ok], add_special_tokens=False))
    rest = iter(tok.encode_batch_fast([p for p, ok in zip(pieces, is_nfc) if not ok], add_special_tokens=False))
    return [next(done if ok else rest).ids for ok in is_nfc]


def _verify_split(text: str, ids: list[int]) -> None:
    if _worker["verify_left"] <= 0:
        return
    _worker["verify_left"] -= 1
    if _worker["tokenizer"].encode(text, add_special_tokens=False).ids != ids:
        raise RuntimeError("cutting long documents at newlines changes this tokenizer's ids (its pretokenizer lets "
                           "a token cross a newline or adds a prefix to every input); rerun with --split-chars 0")


def encode_records(records: list[Record]) -> EncodedBatch:
    """Tokens of every usable record (EOD appended), in order; unusable records are listed in `bad`."""
    settings: EncodeSettings = _worker["settings"]
    bad: list[tuple[int, int, str]] = []
    docs: list[tuple[str, int]] = []  # (text, number of pieces)
    pieces: list[str] = []
    text_bytes = 0
    for source, line, payload in records:
        try:
            text, size, _ = parse_record(payload, settings.text_field)
        except BadRecord as e:
            bad.append((source, line, str(e)))
            continue
        text_bytes += size
        parts = safe_split(text, settings.split_chars)
        docs.append((text, len(parts)))
        pieces += parts
    encoded = iter(_encode(pieces))
    flat: list[int] = []
    lengths = np.zeros(len(docs), np.int64)
    for d, (text, n) in enumerate(docs):
        start = len(flat)
        for _ in range(n):
            flat += next(encoded)
        if n > 1:
            _verify_split(text, flat[start:])
        if settings.eod_id is not None:
            flat.append(settings.eod_id)
        lengths[d] = len(flat) - start
    return EncodedBatch(np.array(flat, dtype=settings.dtype), lengths, bad, text_bytes,
                        empty=sum(1 for text, _ in docs if not text))
