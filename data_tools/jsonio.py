"""Small JSON files (tokenizer configs, reports, stats sidecars) written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, obj: object) -> None:
    """Write `obj` to a temporary file and rename it into place, so readers never see half a
    file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
