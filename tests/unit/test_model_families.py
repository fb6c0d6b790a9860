"""The model families users bring, as tiny random models (rlsys.models.families): the learner's own forward
(decoder + chunked head) agrees with each architecture's Hugging Face forward, and unsupported
architectures are refused before anything starts, naming them."""

from __future__ import annotations

import json

import pytest
import torch

from rlsys.config import ConfigError, ModelConfig
from rlsys.models import check_model_path
from rlsys.models.families import (
    FAMILIES,
    UnsupportedArchitecture,
    build_family_model,
    check_architecture,
    make_family_config,
)
from rlsys.workers.learner.engine import _PolicyModule


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_learners_forward_is_the_architectures_forward(family):
    """The learner replaces the HF forward by decoder + chunked head; for every family it must give the
    logprobs of the model's own forward (a missed soft-cap, scale or final norm shows here)."""
    import transformers

    config = make_family_config(family)
    config.dtype = "float32"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, FAMILIES[family].architecture)(config).eval()
    assert model.config.tie_word_embeddings == FAMILIES[family].tied
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (2, 24), generator=gen)
    attn = torch.ones_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 10:] = True
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
        ref = ref[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        lp, _ = _PolicyModule(model, chunk_tokens=7)(ids, attn, mask)
    assert lp[:, :10].abs().max() == 0
    torch.testing.assert_close(lp[:, 10:], ref[:, 9:], rtol=0, atol=1e-5)


def test_gemma2s_soft_cap_changes_the_logprobs_so_the_test_above_can_fail():
    import transformers

    config = make_family_config("gemma2")
    config.dtype = "float32"
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (1, 16))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        capped, _ = _PolicyModule(model, chunk_tokens=16)(ids, torch.ones_like(ids), mask)
        model.config.final_logit_softcapping = None
        uncapped, _ = _PolicyModule(model, chunk_tokens=16)(ids, torch.ones_like(ids), mask)
    assert (capped - uncapped).abs().max() > 0.05


def test_a_built_family_model_loads_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_family_model(tmp_path / "phi3", "phi3")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert any("qkv_proj" in n for n, _ in model.named_parameters())  # fused in the checkpoint itself
    assert AutoTokenizer.from_pretrained(path).chat_template
    base = build_family_model(tmp_path / "llama-base", "llama", chat=False)
    assert not AutoTokenizer.from_pretrained(base).chat_template
    with pytest.raises(FileExistsError):
        build_family_model(path, "phi3")
    with pytest.raises(ValueError, match="unknown model family"):
        build_family_model(tmp_path / "x", "gpt5")


def test_unsupported_architectures_are_refused_naming_them(tmp_path):
    llama = make_family_config("llama").to_dict()
    assert check_architecture(llama) is None
    with pytest.raises(UnsupportedArchitecture, match=r"FooForCausalLM.*'foo'"):
        check_architecture({"architectures": ["FooForCausalLM"], "model_type": "foo"})
    with pytest.raises(UnsupportedArchitecture, match="model.trust_remote_code=true"):
        check_architecture(
            {"architectures": ["FooForCausalLM"], "model_type": "foo", "auto_map": {"AutoModelForCausalLM": "m.Foo"}}
        )
    remote = {"architectures": ["FooForCausalLM"], "model_type": "foo", "auto_map": {"AutoModelForCausalLM": "m.Foo"}}
    assert "not among rlsys's tested families" in check_architecture(remote, trust_remote_code=True)
    with pytest.raises(UnsupportedArchitecture, match=r"CohereForCausalLM.*logit_scale=0\.0625"):
        check_architecture({"architectures": ["CohereForCausalLM"], "model_type": "cohere", "logit_scale": 0.0625})
    with pytest.raises(UnsupportedArchitecture, match="LlavaForConditionalGeneration"):
        check_architecture({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})
    # Known to transformers, untested here: a warning, not a refusal.
    warning = check_architecture({"architectures": ["OlmoForCausalLM"], "model_type": "olmo"})
    assert warning is not None and warning.startswith("architecture OlmoForCausalLM is not among")

    # Through the job's start-up check: a ConfigError naming model.path and the architecture.
    (tmp_path / "foo").mkdir()
    (tmp_path / "foo" / "config.json").write_text(
        json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"})
    )
    with pytest.raises(ConfigError, match=r"model\.path=.*FooForCausalLM"):
        check_model_path(ModelConfig(path=str(tmp_path / "foo")))
