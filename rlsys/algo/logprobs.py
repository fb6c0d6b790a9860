"""Chunked LM head: per-token log-probs and entropies without full-vocabulary logits for every token.

A causal LM's last hidden states ``[B, L, H]`` and its output embedding ``W [V, H]`` (plus an
optional bias ``[V]``) give ``log pi(token t | tokens < t)`` and the entropy of that next-token
distribution. Materialising all ``[B, L, V]`` logits costs ``B * L * V * 4`` bytes in float32 (GBs
for a real vocabulary); here only the response positions are computed, ``chunk_tokens`` at a
time, so at most a few ``[chunk, V]`` float32 temporaries exist, forward or backward.

Alignment (the same as every ``[N, L]`` array of a :class:`rlsys.records.TrainBatch`): column t
holds the log-prob of token t, computed from hidden state t - 1; column 0 and every position where
``response_mask`` is False hold 0.

Pure torch: no DeepSpeed, Ray or transformers. The learner wraps the model's real output
embedding in :class:`LogprobHead`, so the same Parameter objects take part in the graph (ZeRO-3
gathers them through its module hooks).
"""

from __future__ import annotations

from typing import cast

import torch

__all__ = ["LOGITS_CHUNK_BYTES", "LogprobHead", "auto_chunk_tokens", "chunk_logprob_entropy", "token_logprobs"]

#: Auto chunk size for the head: about this many bytes of float32 logits per chunk.
LOGITS_CHUNK_BYTES = 256 * 1024 * 1024


def auto_chunk_tokens(vocab_size: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's ``[chunk, vocab_size]`` float32 logits take ~``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab_size))


def chunk_logprob_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    entropy_grad: bool,
    logit_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [m, H], targets [m] (int) -> (logprob [m], entropy [m]), both float32, through the LM head.

    ``weight`` [V, H] and ``bias`` [V] (or None) are the output embedding's. ``logit_softcap`` c
    (Gemma 2's ``final_logit_softcapping``) maps the logits z to c * tanh(z / c) before the softmax, as
    the model's own forward and vLLM do; None leaves them as they are. Materialises only this chunk's
    [m, V] logits (float32). The entropy carries a gradient only if ``entropy_grad`` and grad mode are
    both on (an entropy bonus needs it; a logged entropy does not).
    """
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    lse = torch.logsumexp(logits, dim=-1)
    logprob = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprob, entropy


def token_logprobs(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_tokens: int,
    entropy_grad: bool = False,
    logit_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, L, H], input_ids [B, L], response_mask [B, L] (bool) -> (logprobs [B, L], entropy [B, L]).

    Both float32, aligned with ``input_ids`` (see the module docstring), 0 off-response. Only the
    response positions are computed, ``chunk_tokens`` (>= 1) at a time. With grad enabled each chunk
    runs under non-reentrant activation checkpointing, so backward recomputes the chunk's logits
    instead of keeping all of them alive. ``logit_softcap``: see :func:`chunk_logprob_entropy`.
    """
    from torch.utils.checkpoint import checkpoint

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    b, length, _ = hidden.shape
    sel = response_mask[:, 1:]  # [B, L-1]: hidden state t-1 predicts response token t
    h = hidden[:, :-1][sel]  # [M, H]
    targets = input_ids[:, 1:][sel]  # [M]
    m = h.shape[0]
    lps, ents = [], []
    # max(m, 1): with no response token still run one (empty) chunk so that the head's
    # parameters take part in the graph on every rank; ZeRO's gradient hooks expect it.
    for start in range(0, max(m, 1), chunk_tokens):
        hc, tc = h[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            lp, ent = checkpoint(
                chunk_logprob_entropy, hc, tc, weight, bias, entropy_grad, logit_softcap, use_reentrant=False
            )
        else:
            lp, ent = chunk_logprob_entropy(hc, tc, weight, bias, False, logit_softcap)
        lps.append(lp)
        ents.append(ent)
    lp_flat, ent_flat = torch.cat(lps), torch.cat(ents)
    zeros = torch.zeros((b, length - 1), dtype=torch.float32, device=hidden.device)
    lp_out = torch.nn.functional.pad(zeros.masked_scatter(sel, lp_flat), (1, 0))
    ent_out = torch.nn.functional.pad(zeros.masked_scatter(sel, ent_flat), (1, 0))
    return lp_out, ent_out


class LogprobHead(torch.nn.Module):
    """:func:`token_logprobs` as a module holding the SAME Parameter(s) as a model's output embedding.

    ``output_embeddings`` is the model's ``lm_head`` (the tied embedding matrix for tied models);
    its ``weight`` (and ``bias`` if any) are shared, not copied, so a wrapper that gathers or hooks
    parameters per module (ZeRO-3) sees them used by this module; the original ``lm_head`` is never
    called. ``logit_softcap``: the model's final-logit soft-cap, if it has one (see
    :func:`chunk_logprob_entropy`).
    """

    def __init__(
        self, output_embeddings: torch.nn.Module, chunk_tokens: int, logit_softcap: float | None = None
    ) -> None:
        super().__init__()
        if logit_softcap is not None and not logit_softcap > 0:
            raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")
        self.logit_softcap = logit_softcap
        # cast: nn.Module attributes are typed Tensor | Module; an output embedding's are tensors.
        self.weight = cast(torch.Tensor, output_embeddings.weight)
        self.bias = cast("torch.Tensor | None", getattr(output_embeddings, "bias", None))
        self.chunk_tokens = chunk_tokens

    def forward(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, entropy_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, L, H] -> (logprobs [B, L], entropy [B, L]), float32, 0 off-response."""
        return token_logprobs(
            hidden,
            input_ids,
            response_mask,
            self.weight,
            self.bias,
            self.chunk_tokens,
            entropy_grad,
            self.logit_softcap,
        )
