"""Loader of the toy tasks' JSONL files (shipped next to the YAML files, so nothing is downloaded
and the tasks work from any working directory). lm-eval calls ``load`` through the YAML key
``custom_dataset`` with the task's metadata and ``dataset_kwargs`` as keyword arguments."""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def read_jsonl(name: str) -> list[dict]:
    path = os.path.join(HERE, name)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path} line {n}: not JSON ({exc})") from None
    return rows


def load(file: str, split: str = "test", **_metadata) -> dict:
    """``{split: datasets.Dataset}`` of the JSONL file ``file`` in this folder."""
    import datasets

    return {split: datasets.Dataset.from_list(read_jsonl(file))}
