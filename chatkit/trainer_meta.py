"""The small metadata file (`chatkit.json`) every checkpoint and export carries: template, base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "chatkit.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))
