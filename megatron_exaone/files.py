"""Files written whole or not at all: a temporary name in the same folder, then a rename, so a
reader (or a relaunch after a crash) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, value: object, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(value, ensure_ascii=False, indent=indent) + "\n")
