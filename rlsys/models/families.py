"""Tiny random-weight models of the architectures users bring, built locally from a config (no download).

Each family is a 1.4-1.7M-parameter model of the real architecture class (the same
transformers and vLLM code paths as the released checkpoints: fused or split projections, grouped-query
attention, q/k norms, logit soft-capping, sliding windows, tied or untied embeddings), saved with
rlsys's own tokenizer (:mod:`rlsys.models.tokenizer`). ``tests/integration/test_model_families.py``
takes each through the whole path (vLLM, ZeRO-2 and ZeRO-3 learners, weight sync with the probe check,
the HF export in transformers and in vLLM); ``docs/models.md`` has the compatibility table.

Contracts: the same ``(family, seed)`` gives byte-identical weights (transformers' own init under
``torch.manual_seed(seed)``, stored as bfloat16 like the released checkpoints); head size 64 and
``vocab_size`` = the tokenizer's :data:`~rlsys.models.tokenizer.VOCAB_SIZE`; ``chat=False`` saves the
tokenizer without a chat template (a base model, for ``data.prompt_format=plain``).

CLI: ``python -m rlsys.models.families --family llama --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsys.models.tiny import MARKER_FILE, STORAGE_DTYPE, save_random_model
from rlsys.models.tokenizer import EOS_TOKEN_ID, MODEL_MAX_LENGTH, PAD_TOKEN_ID, VOCAB_SIZE

__all__ = ["FAMILIES", "Family", "UnsupportedArchitecture", "build_family_model", "check_architecture"]


# Shared shape: 2 layers, hidden 256, 4 query heads of 64 over 2 KV heads (grouped-query attention).
_SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)


@dataclass(frozen=True)
class Family:
    """One architecture as rlsys builds it: the transformers config class and what differs from ``_SHAPE``."""

    architecture: str  # the config's "architectures" entry, e.g. "LlamaForCausalLM"
    config_class: str  # the transformers config class, e.g. "LlamaConfig"
    tied: bool  # tie_word_embeddings
    overrides: dict[str, Any] = field(default_factory=dict)
    what: str = ""  # what this family exercises that the others do not


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "LlamaConfig", tied=False, what="untied embeddings, split q/k/v"),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", tied=True, what="q/k/v biases, tied embeddings"),
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3Config", tied=True, what="per-head q/k RMSNorm, no q/k/v bias"),
    "mistral": Family(
        "MistralForCausalLM", "MistralConfig", tied=False, overrides={"sliding_window": None}, what="Mistral's class"
    ),
    "gemma2": Family(
        "Gemma2ForCausalLM",
        "Gemma2Config",
        tied=True,
        overrides={
            # 30 in the released models; a random tiny model's logits are far below that, so a small cap
            # makes the soft-cap change every logit (the learner's head must apply it to agree with vLLM).
            "final_logit_softcapping": 0.5,
            "attn_logit_softcapping": 50.0,
            "query_pre_attn_scalar": 64,
            "sliding_window": 512,
            "hidden_activation": "gelu_pytorch_tanh",
        },
        what="logit soft-capping, embedding scaling, (1 + w) RMSNorm, sandwich norms, alternating sliding window",
    ),
    "gemma3": Family(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        tied=True,
        overrides={"query_pre_attn_scalar": 64, "sliding_window": 512, "hidden_activation": "gelu_pytorch_tanh"},
        what="q/k norms, local/global rope, sliding-window layers",
    ),
    "phi3": Family(
        "Phi3ForCausalLM", "Phi3Config", tied=False, what="fused qkv_proj and gate_up_proj in the checkpoint"
    ),
}


# Output-head transforms of some architectures that rlsys's learner head (rlsys.algo.logprobs) does not
# apply: a model with one would train on logprobs that disagree with vLLM's. Key -> its neutral value.
_UNSUPPORTED_HEAD_KEYS = {"logit_scale": 1.0, "logits_scaling": 1.0, "output_mult": 1.0}
TESTED_ARCHITECTURES = frozenset(f.architecture for f in FAMILIES.values())


class UnsupportedArchitecture(ValueError):
    """A checkpoint whose architecture rlsys cannot train (the message names it and why)."""


def check_architecture(hf_config: dict[str, Any], trust_remote_code: bool = False) -> str | None:
    """Check a checkpoint's ``config.json`` (as a dict) before anything starts.

    Raises :class:`UnsupportedArchitecture`, naming the architecture, when it is not a causal LM, when
    transformers cannot build it (the learner loads it with ``AutoModelForCausalLM``) unless
    ``trust_remote_code`` and the config's ``auto_map`` provide the code, or when it transforms its logits
    in a way the learner's head does not reproduce. Returns a warning (a string) for an architecture
    outside rlsys's tested families (:data:`FAMILIES`, ``docs/models.md``), else None.
    """
    archs = list(hf_config.get("architectures") or [])
    causal = [a for a in archs if a.endswith("ForCausalLM")]
    if not causal:
        raise UnsupportedArchitecture(
            f"architecture {archs or '(none declared)'} is not a *ForCausalLM model; rlsys trains decoder-only "
            "causal LMs (e.g. LlamaForCausalLM, Qwen2ForCausalLM)"
        )
    arch = causal[0]
    remote = trust_remote_code and "AutoModelForCausalLM" in (hf_config.get("auto_map") or {})
    # Without a model_type transformers guesses from the path; its loader then has the last word.
    if not remote and hf_config.get("model_type") is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_type = hf_config.get("model_type")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            hint = (
                "; its config has an auto_map: set model.trust_remote_code=true to run the checkpoint's own code"
                if hf_config.get("auto_map")
                else ""
            )
            raise UnsupportedArchitecture(
                f"architecture {arch} (model_type {model_type!r}) is not a causal LM this transformers "
                f"version can build, so the learner cannot load it{hint}"
            )
    for key, neutral in _UNSUPPORTED_HEAD_KEYS.items():
        value = hf_config.get(key)
        if value is not None and value != neutral:
            raise UnsupportedArchitecture(
                f"architecture {arch} scales its logits ({key}={value}), which rlsys's learner head does not "
                "apply; its logprobs would disagree with vLLM's"
            )
    if arch not in TESTED_ARCHITECTURES:
        return (
            f"architecture {arch} is not among rlsys's tested families ({', '.join(sorted(TESTED_ARCHITECTURES))}); "
            "the first weight sync's probe check will tell whether vLLM and the learner agree on it"
        )
    return None


def make_family_config(family: str) -> Any:
    """The transformers config of ``family`` (one of :data:`FAMILIES`); raises ``ValueError`` for others."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    config_cls = getattr(transformers, fam.config_class)
    kwargs: dict[str, Any] = dict(
        _SHAPE,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=fam.tied,
        bos_token_id=None,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        dtype=STORAGE_DTYPE,
        architectures=[fam.architecture],
    )
    kwargs.update(fam.overrides)
    return config_cls(**kwargs)


def build_family_model(out_dir: str | os.PathLike, family: str, seed: int = 0, chat: bool = True) -> Path:
    """Build the random ``(family, seed)`` model and rlsys's tokenizer into ``out_dir`` (new or empty).

    ``chat=False`` leaves the chat template out (a base model). Returns the directory. Raises
    ``ValueError`` for an unknown family and ``FileExistsError`` for a non-empty ``out_dir``.
    """
    out = Path(out_dir)
    config = make_family_config(family)
    n_params = save_random_model(out, FAMILIES[family].architecture, config, seed, chat=chat)
    record = {"family": family, "seed": seed, "chat": chat, "num_params": n_params, "storage_dtype": STORAGE_DTYPE}
    (out / MARKER_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlsys.models.families", description=__doc__.split("\n")[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="a new or empty directory")
    parser.add_argument("--base", action="store_true", help="no chat template (a base model)")
    args = parser.parse_args(argv)
    path = build_family_model(args.out, args.family, seed=args.seed, chat=not args.base)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
