"""Datasets: each turns its source rows into conversations or preference records (chatkit.conversation).

`get_dataset(name)` returns the `DatasetSpec` a `data/<name>/prepare.py` runs through
`chatkit.datasets.prepare.prepare`; `list_datasets()` names them all.
"""

from __future__ import annotations

import importlib

from chatkit.datasets.spec import DatasetSpec

# name -> (module under chatkit.datasets, attribute); modules load on first use.
_DATASETS: dict[str, tuple[str, str]] = {
    "OIG": ("oig", "SPEC"),
    "dolly": ("dolly", "SPEC"),
    "alpaca": ("alpaca", "SPEC"),
    "koalpaca": ("koalpaca", "SPEC"),
    "sharegpt": ("sharegpt", "SPEC"),
    "hc3": ("hc3", "SPEC"),
    "anthropic_hh": ("anthropic_hh", "SPEC"),
    "webgpt": ("webgpt", "SPEC"),
    "summarize_from_feedback": ("summarize_from_feedback", "SPEC"),
    "preference": ("preference", "SPEC"),
    "toolcall": ("toolcall", "SPEC"),
    "mqa": ("long_data", "MQA"),
    "booksum": ("long_data", "BOOKSUM"),
}


def list_datasets() -> list[str]:
    return list(_DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    try:
        module, attr = _DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(_DATASETS)}") from None
    return getattr(importlib.import_module(f"chatkit.datasets.{module}"), attr)
