"""Bundled multilingual sample corpus for offline demos and tests.

The ``*.jsonl`` files in this folder hold short, original documents (one JSON
object per line: ``{"id": ..., "lang": ..., "text": ...}``) in Korean, English,
Spanish, German, Japanese, Vietnamese, plus a few source-code snippets. They
are released under CC0-1.0; see ``README.md``. The corpus is far too small for
real pretraining and is meant for tokenizer-training, sharding and tiny-model
smoke runs on CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["CORPUS_DIR", "LANGUAGES", "files", "iter_texts"]

CORPUS_DIR: Path = Path(__file__).resolve().parent
LANGUAGES: tuple[str, ...] = ("ko", "en", "es", "de", "ja", "vi", "code")


def files(languages: Iterable[str] | None = None) -> list[Path]:
    """Return the ``.jsonl`` paths for ``languages`` (all if None), in LANGUAGES order.

    Raises:
        ValueError: if a requested language is not one of LANGUAGES.
    """
    if isinstance(languages, str):  # allow files("ko") as well as files(["ko"])
        languages = (languages,)
    wanted = set(LANGUAGES if languages is None else languages)
    unknown = sorted(wanted.difference(LANGUAGES))
    if unknown:
        raise ValueError(
            f"unknown sample-corpus language(s): {', '.join(unknown)}; "
            f"valid: {', '.join(LANGUAGES)}"
        )
    return [CORPUS_DIR / f"{lang}.jsonl" for lang in LANGUAGES if lang in wanted]


def iter_texts(languages: Iterable[str] | None = None) -> Iterator[str]:
    """Yield the ``text`` of every document in the selected files, in file order."""
    for path in files(languages):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)["text"]
