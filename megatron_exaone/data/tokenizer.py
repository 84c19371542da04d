"""Loading Hugging Face `tokenizer.json` files and resolving their special-token roles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from tokenizers import Tokenizer

# Tried in order when neither the caller nor tokenizer_config.json names an end-of-document token.
COMMON_EOD_TOKENS = (
    "<|endoftext|>",
    "<|endofdocument|>",
    "<|end_of_text|>",
    "</s>",
    "[EOS]",
    "<eos>",
)


def tokenizer_json_path(path: str | os.PathLike) -> Path:
    """The `tokenizer.json` named by `path`: the file itself or a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: no tokenizer.json here; pass a tokenizer.json file or a directory holding one "
            "(for example a downloaded Hugging Face model directory)"
        )
    return p


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_json_path(path)))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_config(path: str | os.PathLike) -> dict:
    """tokenizer_config.json beside the tokenizer.json (empty when absent)."""
    cfg = tokenizer_json_path(path).with_name("tokenizer_config.json")
    return json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}


def _token_content(value: object) -> str | None:
    # tokenizer_config.json stores a token either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def resolve_eod(
    path: str | os.PathLike, tokenizer: Tokenizer, eod_token: str | None = None
) -> tuple[str, int]:
    """(token, id) appended after every document.

    Order: the explicit `eod_token`; `eod_token` then `eos_token` of tokenizer_config.json; the
    first of COMMON_EOD_TOKENS the vocabulary holds.
    """
    if eod_token is not None:
        candidates = [eod_token]
    else:
        cfg = tokenizer_config(path)
        candidates = [
            t
            for t in (_token_content(cfg.get("eod_token")), _token_content(cfg.get("eos_token")))
            if t
        ]
        candidates += COMMON_EOD_TOKENS
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, token_id
    if eod_token is not None:
        raise ValueError(
            f"end-of-document token {eod_token!r} is not in the vocabulary of "
            f"{tokenizer_json_path(path)}"
        )
    raise ValueError(
        f"{tokenizer_json_path(path)}: cannot tell which token ends a document (no eos_token in "
        f"tokenizer_config.json and none of {', '.join(COMMON_EOD_TOKENS)} in the vocabulary); "
        "pass --eod-token TOKEN, or --no-eod"
    )


def special_token_ids(path: str | os.PathLike) -> dict[str, int | list[int]]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"}: the ids of the tokens tokenizer_config.json
    names for these roles, looked up in tokenizer.json; a role the tokenizer does not define is left
    out. Generation must stop where the training documents ended, so the end-of-document token
    (`resolve_eod`) joins eos: eos is [eos, end-of-document] when they differ, the end-of-document
    token alone when there is no eos_token."""
    tokenizer = load_tokenizer(path)
    cfg = tokenizer_config(path)
    ids: dict[str, int | list[int]] = {}
    for role in ("bos", "eos", "pad"):
        token = _token_content(cfg.get(f"{role}_token"))
        if token is None:
            continue
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{tokenizer_json_path(path).with_name('tokenizer_config.json')}: {role}_token "
                f"{token!r} is not in the vocabulary of tokenizer.json; fix {role}_token there"
            )
        ids[f"{role}_token_id"] = token_id
    # no end-of-document token either: the caller keeps its own id
    with contextlib.suppress(ValueError):
        eod = resolve_eod(path, tokenizer)[1]
        eos = ids.get("eos_token_id")
        ids["eos_token_id"] = eod if eos in (None, eod) else [eos, eod]
    return ids
