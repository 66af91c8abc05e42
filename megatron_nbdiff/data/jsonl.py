"""Line-numbered reading of JSONL files for the tools that take prompts or texts as JSONL."""
from __future__ import annotations

import json
from typing import Iterator


def iter_jsonl(path: str, error: type[Exception]) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for every non-empty line of ``path``; a line that is not
    JSON raises ``error("<path> line <n>: not JSON (...)")``. Callers check the value's fields."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except ValueError as exc:
                raise error(f"{path} line {n}: not JSON ({exc})") from None
