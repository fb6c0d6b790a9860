"""Unit tests for the locally built tiny Qwen2 model and tokenizer (rlsys.models).

One tiny model (seed 0) is built per module into a temp dir (~0.5 s); everything else reads it.
No hub access: HF_HUB_OFFLINE is forced before transformers is imported.
"""

from __future__ import annotations

import json
import os
import random
import threading
import unicodedata
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlsys.models import tiny
from rlsys.models.tokenizer import (
    EOS_TOKEN_ID,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IM_START_TOKEN_ID,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    iter_corpus,
)

MODEL_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", size="tiny", seed=0)


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_directory_layout_and_record(model_dir):
    for name in MODEL_FILES:
        assert (model_dir / name).is_file(), name
    rec = tiny.read_build_record(model_dir)
    assert rec is not None
    assert (rec["format_version"], rec["size"], rec["seed"]) == (tiny.FORMAT_VERSION, "tiny", 0)
    assert rec["storage_dtype"] == "bfloat16"


def test_checkpoint_is_bf16_and_tied(model_dir):
    """Stored as bf16 (as real Qwen2 checkpoints are) and, with tied embeddings, no lm_head."""
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is True
    assert cfg["model_type"] == "qwen2"
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert "lm_head.weight" not in keys
        assert "model.embed_tokens.weight" in keys
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}


def test_hf_load_param_count_and_forward(hf_model, hf_tok):
    n = sum(p.numel() for p in hf_model.parameters())
    assert 1_000_000 <= n <= 5_000_000, n
    assert n == tiny.read_build_record(hf_model.name_or_path)["num_params"]
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    ids = hf_tok("Use the numbers [3, 5, 7] to make 26.", return_tensors="pt")["input_ids"]
    assert ids.shape[0] == 1 and ids.shape[1] > 5
    with torch.no_grad():
        logits = hf_model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_default_load_is_bf16_exact_upcast(model_dir, hf_model):
    """transformers 5 defaults to dtype="auto" (bf16 here); fp32 loading is an exact upcast."""
    bf = AutoModelForCausalLM.from_pretrained(model_dir)
    assert bf.dtype == torch.bfloat16
    for (name, p32), (_, p16) in zip(hf_model.named_parameters(), bf.named_parameters(), strict=True):
        assert torch.equal(p32, p16.float()), name


def test_chat_template(hf_tok):
    user = [{"role": "user", "content": "Solve: 2+2=?"}]
    assert hf_tok.apply_chat_template(user, tokenize=False) == ("<|im_start|>user\nSolve: 2+2=?<|im_end|>\n")
    with_sys = [{"role": "system", "content": "Be brief."}] + user
    rendered = hf_tok.apply_chat_template(with_sys, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSolve: 2+2=?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    full = user + [{"role": "assistant", "content": "\\boxed{4}"}]
    assert hf_tok.apply_chat_template(full, tokenize=False).endswith("\\boxed{4}<|im_end|>\n")
    # ChatML markers are single special tokens; no BOS is prepended.
    ids = hf_tok(rendered, add_special_tokens=True)["input_ids"]
    assert ids[0] == IM_START_TOKEN_ID
    assert ids.count(IM_START_TOKEN_ID) == 3 and ids.count(EOS_TOKEN_ID) == 2


def test_special_ids_agree(model_dir, hf_tok):
    config = AutoConfig.from_pretrained(model_dir)
    gen = GenerationConfig.from_pretrained(model_dir)
    assert hf_tok.eos_token == IM_END_TOKEN and hf_tok.pad_token == PAD_TOKEN
    assert hf_tok.bos_token is None and hf_tok.bos_token_id is None
    assert config.eos_token_id == gen.eos_token_id == hf_tok.eos_token_id == EOS_TOKEN_ID
    assert config.pad_token_id == gen.pad_token_id == hf_tok.pad_token_id == PAD_TOKEN_ID
    assert config.bos_token_id is None and gen.bos_token_id is None
    assert hf_tok.convert_tokens_to_ids(IM_START_TOKEN) == IM_START_TOKEN_ID
    assert len(hf_tok) == config.vocab_size == VOCAB_SIZE
    assert hf_tok.model_max_length == config.max_position_embeddings == 1024
    assert hf_tok.unk_token is None


def _ascii_samples() -> list[str]:
    rng = random.Random(0)
    printable = "".join(chr(c) for c in range(32, 127)) + "\n\t\r"
    out = [printable, "".join(chr(c) for c in range(128)), "", " ", "  leading and trailing  "]
    out += ["".join(rng.choice(printable) for _ in range(rng.randint(1, 80))) for _ in range(200)]
    return out


UNICODE_SAMPLES = [
    "héllo wörld, ça va? ñ ß Ω",
    "日本語のテキスト 中文 한국어",
    "emoji 🤖🚀 and a flag 🇺🇸 and zwj 👩‍👩‍👧",
    "math: ∑ x² ≤ √2 · π ≈ 3.14159",
    "\u200b zero width \ufeff bom \x00 nul \x7f del",
    "Привет мир العربية עברית",
]


@pytest.mark.parametrize("kind", ["ascii", "unicode"])
def test_round_trip(hf_tok, model_dir, kind):
    """decode(encode(s)) == s for NFC strings, through both AutoTokenizer and the raw file."""
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    samples = _ascii_samples() if kind == "ascii" else UNICODE_SAMPLES
    for s in samples:
        ids = hf_tok(s, add_special_tokens=False)["input_ids"]
        assert hf_tok.decode(ids) == s
        assert raw.encode(s, add_special_tokens=False).ids == ids
        assert raw.decode(ids, skip_special_tokens=False) == s


def test_non_nfc_is_normalized_like_qwen2(hf_tok):
    """AutoTokenizer for qwen2 always applies NFC (as real Qwen2 does): decode gives NFC(s)."""
    s = "e\u0301 a\u0308"  # decomposed accents
    ids = hf_tok(s, add_special_tokens=False)["input_ids"]
    assert hf_tok.decode(ids) == unicodedata.normalize("NFC", s)


def test_raw_tokenizer_matches_auto_tokenizer_on_corpus(hf_tok, model_dir):
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for doc in iter_corpus(300, seed=7):
        assert raw.encode(doc).ids == hf_tok(doc)["input_ids"]


def test_digits_are_single_tokens(hf_tok):
    s = "12345 + 67890 = 80235, 3.14159 and x9y0"
    toks = hf_tok.convert_ids_to_tokens(hf_tok(s)["input_ids"])
    for t in toks:
        if any(ch.isdigit() for ch in t):
            assert len(t) == 1, toks
    common = "Use the numbers to make Answer Solve reverse sort list maze"
    # The corpus makes task words cheap: far fewer tokens than characters.
    assert len(hf_tok(common)["input_ids"]) <= 12


def test_same_seed_identical_files_different_seed_different_weights(model_dir, tmp_path):
    again = tiny.build_tiny_model(tmp_path / "seed0", size="tiny", seed=0)
    for name in MODEL_FILES:
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    other = tiny.build_tiny_model(tmp_path / "seed1", size="tiny", seed=1)
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    # The tokenizer does not depend on the model seed.
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    tiny.build_tiny_model(tmp_path / "m", size="tiny", seed=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_build_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny-model size"):
        tiny.make_config("huge")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_model(tmp_path / "full")
    with pytest.raises(ValueError):
        tiny.ensure_tiny_model(size="huge", cache_dir=tmp_path / "cache")


def test_100m_config_param_count():
    from transformers import Qwen2ForCausalLM

    config = tiny.make_config("100m")
    assert config.hidden_size // config.num_attention_heads == 64
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert 80_000_000 <= n <= 110_000_000, n


@pytest.fixture
def build_counter(monkeypatch):
    """Counts calls to build_tiny_model made by ensure_tiny_model."""
    calls: list[tuple[str, int]] = []
    real = tiny.build_tiny_model

    def counting(out_dir, size="tiny", seed=0):
        calls.append((size, seed))
        return real(out_dir, size=size, seed=seed)

    monkeypatch.setattr(tiny, "build_tiny_model", counting)
    return calls


def test_ensure_builds_once_and_reuses(tmp_path, monkeypatch, build_counter, model_dir):
    monkeypatch.setenv("RLSYS_CACHE_DIR", str(tmp_path / "envcache"))
    path = tiny.ensure_tiny_model()
    assert path == tmp_path / "envcache" / "models" / f"qwen2-tiny-seed0-v{tiny.FORMAT_VERSION}"
    assert build_counter == [("tiny", 0)]
    marker_mtime = (path / tiny.MARKER_FILE).stat().st_mtime_ns
    assert tiny.ensure_tiny_model(size="tiny", seed=0) == path
    assert build_counter == [("tiny", 0)]
    assert (path / tiny.MARKER_FILE).stat().st_mtime_ns == marker_mtime
    # The cached copy is the same deterministic build.
    assert (path / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    # Nothing but the model dir and its lock file is left in the cache.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f".{path.name}.lock"])


def test_ensure_ignores_half_built_dirs(tmp_path, build_counter):
    final = tiny.model_cache_path("tiny", 2, cache_dir=tmp_path)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # interrupted copy: no completion marker
    leftover = final.parent / f".{final.name}.tmp-dead"  # crashed builder's temp dir
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"garbage")
    path = tiny.ensure_tiny_model(size="tiny", seed=2, cache_dir=tmp_path)
    assert path == final
    assert build_counter == [("tiny", 2)]
    assert tiny.read_build_record(path)["seed"] == 2
    assert not leftover.exists()
    AutoModelForCausalLM.from_pretrained(path)  # complete and loadable


def test_ensure_concurrent_builders_build_once(tmp_path, build_counter):
    """Two concurrent callers (separate lock fds, as two processes would have) share one build."""
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(tiny.ensure_tiny_model(size="tiny", seed=4, cache_dir=tmp_path))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1]
    assert build_counter == [("tiny", 4)]
    assert tiny.read_build_record(results[0])["seed"] == 4


def test_cli(tmp_path, capsys):
    assert tiny.main(["--size", "tiny", "--seed", "5", "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(tmp_path / "cli")
    assert out[1].startswith("params: 2230528 ")  # the 2-layer tiny model
    assert tiny.read_build_record(tmp_path / "cli")["seed"] == 5
