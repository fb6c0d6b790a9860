"""vLLM worker extension: the public hook through which new weights enter a running engine.

vLLM loads this class into its worker (``LLM(worker_extension_cls="rlsys.workers.vllm_ext.
WeightReloadExtension")``) and ``llm.collective_rpc("rlsys_reload_weights", ...)`` calls it.
On CPU, ``model.load_weights`` alone fails because vLLM prepacks linear weights and empties
``layer.weight``; ``model_runner.reload_weights(is_checkpoint_format=True)`` re-runs the loader's
processing layer by layer, so checkpoint-format tensors go in and kernel-format weights come out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class WeightReloadExtension:
    """Mixed into vLLM's worker; ``self`` is the worker (it has ``model_runner``)."""

    model_runner: Any  # the vLLM worker's, once mixed in

    def rlsys_reload_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Load checkpoint-format (name, tensor) pairs; returns the names that were consumed.

        ``weights`` may be a lazy iterator (e.g. pulling buckets from Ray's object store) so that
        only one bucket is resident at a time. Works with the in-process engine, which passes the
        iterator through unchanged (a multi-process engine would have to pickle it).
        """
        seen: list[str] = []
        # The learner sends a tied embedding once, as checkpoints store it. vLLM models that keep a separate
        # lm_head module (Qwen2, Llama: tied by sharing the Parameter) reload each module's kernel-format
        # weight on its own, so the head must receive the matrix under its own name too; models that
        # compute logits from the embedding itself (Gemma 2 / 3) have no lm_head and refuse the name.
        alias_head = self._needs_tied_head_alias()

        def tracked() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                seen.append(name)
                yield name, tensor
                if alias_head and name == "model.embed_tokens.weight":
                    yield "lm_head.weight", tensor

        self.model_runner.reload_weights(weights_iterator=tracked(), is_checkpoint_format=True)
        return seen

    def _needs_tied_head_alias(self) -> bool:
        model = self.model_runner.get_model()
        tied = bool(getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False))
        head = getattr(model, "lm_head", None)
        return tied and isinstance(getattr(head, "weight", None), torch.Tensor)

    def rlsys_param_names(self) -> list[str]:
        """Names of the engine's parameters (vLLM naming, e.g. fused qkv_proj)."""
        return [name for name, _ in self.model_runner.get_model().named_parameters()]
