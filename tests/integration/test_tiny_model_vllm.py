"""vLLM (CPU, in-process) serves the locally built tiny model, and agrees with transformers.

One engine per module (~2-3 s to start on the 2-core CPU box, ~2 GB RSS): in-process engine core
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` before vllm is imported, ``distributed_executor_backend="uni"``),
eager mode, a 64 MiB KV cache, loopback only. The HF reference logprobs are computed before the
engine starts because vLLM pins the process to one torch thread once it is up.

Logprob agreement: HF runs the bf16 checkpoint upcast to fp32, vLLM runs it in bf16, so the
difference is bf16 compute noise only (identical weights); the tolerance is 0.05 nats.
"""

from __future__ import annotations

import gc
import math
import os
import time

# Must be set before vllm is imported (vllm reads them at import / engine start). vllm itself is
# imported only inside fixtures, so collecting this file (even deselected) stays cheap.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the teardown assumes the in-process engine
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from rlsys.models.tiny import build_tiny_model
from rlsys.models.tokenizer import EOS_TOKEN_ID, iter_corpus

pytestmark = pytest.mark.integration

LOGPROB_TOL = 0.05  # nats; bf16 (vLLM) vs fp32 (HF) on identical bf16-representable weights
N_SAMPLES = 4
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny-seed0", size="tiny", seed=0)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def hf_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """fp32 logprob of ids[t] given ids[:t], for t = 1..len(ids)-1. Shape [len(ids) - 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def fixed_sequences(tokenizer):
    """Three token sequences of different lengths (chat-formatted task text), as id lists."""
    docs = list(iter_corpus(3, seed=11))
    docs[2] = docs[2] * 3  # a longer one (> 100 tokens) exercises more rotary positions
    return [tokenizer(d)["input_ids"] for d in docs]


@pytest.fixture(scope="module")
def hf_reference(hf_model, fixed_sequences):
    # Before the engine exists: vLLM drops this process to one torch thread once it starts.
    return [hf_token_logprobs(hf_model, ids) for ids in fixed_sequences]


@pytest.fixture(scope="module")
def llm(model_dir, hf_reference):
    from vllm import LLM

    t0 = time.perf_counter()
    engine = LLM(
        model=str(model_dir),
        dtype="bfloat16",
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=64 << 20,
        max_model_len=1024,
        seed=0,
    )
    print(f"\n[vllm] engine start {time.perf_counter() - t0:.2f}s")
    yield engine
    # Shut the engine down explicitly: an engine left to the garbage collector leaks its
    # rendezvous file and shared memory.
    engine.llm_engine.engine_core.shutdown()
    del engine
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    gc.collect()


def test_engine_uses_model_config(llm, tokenizer):
    mc = llm.llm_engine.model_config
    assert mc.dtype == torch.bfloat16
    assert mc.get_vocab_size() == len(tokenizer)
    assert mc.get_head_size() == 64
    vtok = llm.get_tokenizer()
    assert vtok.eos_token_id == EOS_TOKEN_ID
    ids = tokenizer("Use the numbers [3, 5, 7] to make 26.")["input_ids"]
    assert vtok("Use the numbers [3, 5, 7] to make 26.")["input_ids"] == ids


def test_generate_n_samples_with_logprobs(llm, tokenizer, hf_model):
    from vllm import SamplingParams

    questions = [
        "Solve: 12+7*3=?",
        "Reverse the list: [4, 1, 3]",
        "Use the numbers [2, 3, 4] to make 24.",
    ]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    params = SamplingParams(n=N_SAMPLES, max_tokens=MAX_TOKENS, logprobs=0, temperature=1.0, seed=1234)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    print(f"\n[vllm] generate {len(prompts)}x{N_SAMPLES}x{MAX_TOKENS} tokens {elapsed:.2f}s")
    assert len(outs) == len(prompts)
    worst = 0.0
    for out in outs:
        assert len(out.outputs) == N_SAMPLES
        for comp in out.outputs:
            assert 1 <= len(comp.token_ids) <= MAX_TOKENS
            assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids)
            lps = [step[tok].logprob for step, tok in zip(comp.logprobs, comp.token_ids, strict=True)]
            assert all(math.isfinite(lp) and lp <= 0.0 for lp in lps)
            # The behaviour logprobs an RL learner would store must match its own recomputation.
            full = list(out.prompt_token_ids) + list(comp.token_ids)
            ref = hf_token_logprobs(hf_model, full)[len(out.prompt_token_ids) - 1 :]
            worst = max(worst, (torch.tensor(lps) - ref).abs().max().item())
    print(f"[vllm] sampled-token logprobs vs HF fp32: max |diff| = {worst:.4f}")
    assert worst < LOGPROB_TOL


def test_prompt_logprobs_match_transformers(llm, fixed_sequences, hf_reference):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in fixed_sequences], params, use_tqdm=False)
    worst = 0.0
    for ids, out, ref in zip(fixed_sequences, outs, hf_reference, strict=True):
        plp = out.prompt_logprobs
        assert plp is not None and len(plp) == len(ids) and plp[0] is None
        got = torch.tensor([plp[t][ids[t]].logprob for t in range(1, len(ids))])
        assert torch.isfinite(got).all() and (got <= 0).all()
        worst = max(worst, (got - ref).abs().max().item())
    spread = torch.cat(hf_reference).std().item()
    print(f"\n[vllm] prompt logprobs vs HF fp32: max |diff| = {worst:.4f} (logprob std {spread:.3f})")
    assert worst < LOGPROB_TOL
