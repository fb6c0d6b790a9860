"""Deterministic tiny Qwen2 models in Hugging Face format, built locally (no hub access).

A built directory holds what ``AutoModelForCausalLM`` / ``AutoTokenizer`` / vLLM expect:
``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``, plus ``rlsys_model.json`` (this module's
completion marker and build record).

Contracts:

* Weights are random, drawn by transformers' own init (``Qwen2ForCausalLM(config)`` under
  ``torch.manual_seed(seed)``), so the same ``(size, seed)`` gives byte-identical safetensors.
* Weights are stored as bfloat16 and ``config.json`` says ``"dtype": "bfloat16"``, as in real
  Qwen2 checkpoints. vLLM (``dtype="auto"``) runs in bf16 on exactly these values; a learner that
  loads with ``dtype=torch.float32`` gets an exact upcast, so both start from identical weights.
  Note: transformers 5 ``from_pretrained`` defaults to ``dtype="auto"`` and would load bf16;
  pass ``dtype=torch.float32`` for training.
* ``tie_word_embeddings=True`` (as in Qwen2-0.5B/1.5B): the checkpoint has no ``lm_head.weight``;
  the LM head is ``model.embed_tokens.weight``.
* ``eos_token_id`` = ``<|im_end|>`` (2), ``pad_token_id`` = ``<|endoftext|>`` (0), no BOS, in
  config, generation config and tokenizer alike.

CLI: ``python -m rlsys.models.tiny --size tiny --seed 0 [--out DIR]`` prints the directory and
the parameter count (``--out`` builds into DIR; without it the cached copy is used or built).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlsys.fsutil import build_dir_once
from rlsys.models.tokenizer import (
    EOS_TOKEN_ID,
    MODEL_MAX_LENGTH,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    train_tokenizer,
)

# Bump whenever anything that changes the built files changes (configs, tokenizer corpus,
# storage dtype): cached directories are keyed by it, so stale builds are never reused.
FORMAT_VERSION = 2  # 2: the "tiny" size has 2 layers (was 4)
MARKER_FILE = "rlsys_model.json"
STORAGE_DTYPE = "bfloat16"

# head_dim is 64 for every size: the most widely supported head size across vLLM attention
# backends (CPU included). Both sizes use grouped-query attention (fewer KV heads than query
# heads), like real Qwen2 models, so weight-sync code sees k/v projections narrower than q.
SIZES: dict[str, dict[str, Any]] = {
    # ~2.2M params: small enough for fast unit tests and CPU RL loops. Two layers, not four: the
    # default job learns as much with half the compute (reports/hardware/README.md, "tiny model").
    "tiny": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # ~100M params for throughput benchmarks.
    "100m": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
}


def make_config(size: str = "tiny"):
    """Return the ``Qwen2Config`` for ``size`` (one of :data:`SIZES`); raises ``ValueError``."""
    from transformers import Qwen2Config

    if size not in SIZES:
        raise ValueError(f"unknown tiny-model size {size!r}; choose one of {sorted(SIZES)}")
    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        dtype=STORAGE_DTYPE,
        architectures=["Qwen2ForCausalLM"],
        **SIZES[size],
    )


def count_params(model) -> int:
    """Number of distinct parameters (a tied embedding/LM-head matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' per-shard progress bar while saving; restores the caller's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_random_model(out_dir: str | os.PathLike, architecture: str, config: Any, seed: int, chat: bool = True) -> int:
    """Build a random-weight ``architecture`` (a transformers class name) from ``config`` and save it with
    rlsys's tokenizer into ``out_dir`` (new or empty; ``FileExistsError`` otherwise). Returns the number
    of distinct parameters. No completion marker: the callers write their own.

    Weights come from transformers' own init under ``torch.manual_seed(seed)`` and are stored in
    :data:`STORAGE_DTYPE`, so the same inputs give byte-identical files; the caller's global torch RNG
    state is left untouched. ``chat=False`` leaves the chat template out (a base model).
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"refusing to build into non-empty directory {out}")
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, architecture)(config)
    model = model.to(getattr(torch, STORAGE_DTYPE)).eval()
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID)
    n_params = count_params(model)
    with _quiet_progress_bars():
        model.save_pretrained(str(out), safe_serialization=True)
    del model
    tok = train_tokenizer()
    if not chat:
        tok.chat_template = None
    tok.save_pretrained(str(out))
    if not chat:
        (out / "chat_template.jinja").unlink(missing_ok=True)
    for f in out.iterdir():
        # safetensors writes 0600; a shared cache (other users, containers) needs read access.
        f.chmod(0o644)
    return n_params


def build_tiny_model(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Build the ``(size, seed)`` model plus tokenizer into ``out_dir`` and return its path.

    ``out_dir`` must not exist or be empty (``FileExistsError`` otherwise). Writes are not atomic
    here; :func:`ensure_tiny_model` adds atomicity and caching on top. The caller's global torch
    RNG state is left untouched. Every file, the marker included, is a deterministic function of
    ``(size, seed, FORMAT_VERSION)`` and the library versions. Raises ``ValueError`` for an
    unknown size.
    """
    out = Path(out_dir)
    config = make_config(size)  # first: an unknown size raises before anything is written
    n_params = save_random_model(out, "Qwen2ForCausalLM", config, seed)
    record = {
        "format_version": FORMAT_VERSION,
        "size": size,
        "seed": seed,
        "num_params": n_params,
        "storage_dtype": STORAGE_DTYPE,
    }
    # The marker is written last: its presence means every other file is complete.
    (out / MARKER_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def default_cache_dir() -> Path:
    """``$RLSYS_CACHE_DIR`` if set, else ``~/.cache/rlsys``."""
    env = os.environ.get("RLSYS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rlsys"


def model_cache_path(size: str = "tiny", seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`ensure_tiny_model` keeps the ``(size, seed)`` model."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "models" / f"qwen2-{size}-seed{seed}-v{FORMAT_VERSION}"


def read_build_record(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The marker's build record, or None when the directory is missing or incomplete."""
    marker = Path(model_dir) / MARKER_FILE
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _why_unusable(model_dir: Path, size: str, seed: int) -> str | None:
    rec = read_build_record(model_dir)
    if rec is None:
        return "no completion marker"
    if (rec.get("format_version"), rec.get("size"), rec.get("seed")) != (FORMAT_VERSION, size, seed):
        return "built for another size, seed or format version"
    for name in ("config.json", "tokenizer.json"):
        if not (model_dir / name).is_file():
            return f"{name} is missing"
    return None


def ensure_tiny_model(size: str = "tiny", seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached ``(size, seed)`` model directory, building it first if needed.

    Safe under concurrency and interruption (:func:`rlsys.fsutil.build_dir_once`: lock, private temp
    dir, rename): the target path either does not exist or is complete, and an unusable directory
    there is moved aside and rebuilt.
    """
    if size not in SIZES:
        raise ValueError(f"unknown tiny-model size {size!r}; choose one of {sorted(SIZES)}")
    final = model_cache_path(size, seed, cache_dir)

    def build(tmp: Path) -> None:
        build_tiny_model(tmp, size=size, seed=seed)

    return build_dir_once(final, lambda d: _why_unusable(d, size, seed), build, what="tiny model cache")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlsys.models.tiny",
        description="Build (or find in the cache) a deterministic tiny Qwen2 model directory.",
    )
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="build into this (new or empty) directory instead of the cache")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $RLSYS_CACHE_DIR or ~/.cache/rlsys)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.out is not None:
        path = build_tiny_model(args.out, size=args.size, seed=args.seed)
    else:
        path = ensure_tiny_model(size=args.size, seed=args.seed, cache_dir=args.cache_dir)
    rec = read_build_record(path) or {}
    print(path)
    elapsed = time.perf_counter() - t0
    print(f"params: {rec.get('num_params')} (size={args.size}, seed={args.seed}, {elapsed:.2f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
