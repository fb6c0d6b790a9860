"""Locally built models and tokenizer (no hub access): see :mod:`rlsys.models.tiny`.

Exports are resolved lazily (PEP 562) so that ``python -m rlsys.models.tiny`` does not import
the module twice and importing the package stays cheap (no torch/transformers until used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FORMAT_VERSION": "rlsys.models.tiny",
    "SIZES": "rlsys.models.tiny",
    "build_tiny_model": "rlsys.models.tiny",
    "default_cache_dir": "rlsys.models.tiny",
    "ensure_tiny_model": "rlsys.models.tiny",
    "make_config": "rlsys.models.tiny",
    "model_cache_path": "rlsys.models.tiny",
    "read_build_record": "rlsys.models.tiny",
    "CHAT_TEMPLATE": "rlsys.models.tokenizer",
    "EOS_TOKEN_ID": "rlsys.models.tokenizer",
    "IM_START_TOKEN_ID": "rlsys.models.tokenizer",
    "PAD_TOKEN_ID": "rlsys.models.tokenizer",
    "VOCAB_SIZE": "rlsys.models.tokenizer",
    "train_tokenizer": "rlsys.models.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlsys.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
