"""model=smollm2 for real: the shipped GGUF converted into a Hugging Face folder (tied embeddings, chat
template and tokenizer kept). The training job on it (vLLM, the reward pool, DeepSpeed, the sync check)
runs in tests/integration/test_byo_guide.py, which takes the same converted folder through the
bring-your-own guide (evaluation, then two steps of training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.models import smollm2

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rlsys-cache")


@pytest.fixture(scope="module")
def converted(cache_dir) -> Path:
    return smollm2.ensure_smollm2(cache_dir=cache_dir)


def test_the_conversion_is_the_pretrained_model_with_its_tokenizer(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((converted / smollm2.MARKER_FILE).read_text())
    assert record["architecture"] == "LlamaForCausalLM" and record["num_params"] == 134_515_008
    assert smollm2.check_conversion(converted, record["gguf_sha256"]) is None
    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49_152
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 17 + 25?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert tok.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    # The pretrained model's own (wrong) greedy answer: a random or mis-dequantized model says otherwise.
    assert tok.decode(out[0][ids["input_ids"].shape[1] :]).startswith("17 + 25 = 32")
