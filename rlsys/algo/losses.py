"""Token-level policy-gradient losses: GRPO, DAPO and CISPO (paper-notes Sec. 2).

Shapes: ``[N, T]`` = N sequences (rows) x T tokens; ``response_mask`` is True where a token counts
(response tokens, not prompt or padding). The F-GRPO focal weight enters only through the
advantages passed in (``A^F = g * A``); the losses themselves are the base objectives unchanged.

Exact micro-batching: every aggregation mode is "sum of per-row terms / normalizer". When each
micro-batch (or data-parallel shard) passes the SAME global ``normalizer`` (total masked tokens for
``token_mean``, total non-empty sequences for the ``seq_*`` modes), the sum of the micro-batch losses
equals the full-batch loss, and so does the sum of their gradients. Data-parallel training that
AVERAGES gradients over W ranks (DDP / DeepSpeed all-reduce mean) must pass ``global / W`` instead,
so that the average of the rank gradients is the full-batch gradient.
"""

from __future__ import annotations

import math

import torch

from rlsys.choices import AGG_MODES, LOSS_TYPES  # the one definition of the vocabularies

__all__ = ["LOSS_TYPES", "AGG_MODES", "DEFAULT_CLIP", "kl_k3", "policy_loss"]

#: Per-type default (eps_low, eps_high): the clip range of the ratio is [1 - eps_low, 1 + eps_high].
#: GRPO symmetric 0.2; DAPO clip-higher 0.28; CISPO clips its IS weight to [0, 6] (paper-notes Sec. 2).
DEFAULT_CLIP = {"grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "cispo": (1.0, 5.0)}

Number = int | float


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) from tokens sampled by pi (Schulman's "k3").

    ``k3 = exp(ref - logp) - (ref - logp) - 1``, elementwise, always >= 0, unbiased for the KL when
    the tokens come from pi. Any matching shapes; differentiable in both inputs.
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def _check_float_tensor(name: str, x: object, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (= logprobs' [N, T]), got {tuple(x.shape)}")
    return x


def _check_eps(name: str, value: Number) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number (an epsilon of the clip range), got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite epsilon >= 0 (clip range [1 - low, 1 + high]), got {value}")
    return value


def _check_coef(name: str, value: Number) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def _check_normalizer(normalizer: object) -> float | torch.Tensor:
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got a tensor of shape {tuple(normalizer.shape)}")
        if not bool(torch.isfinite(normalizer).all()) or not bool((normalizer > 0).all()):
            raise ValueError(f"normalizer must be finite and > 0, got {normalizer.item()}")
        return normalizer.detach().reshape(())
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise ValueError(f"normalizer must be a positive number or scalar tensor, got {normalizer!r}")
    if not math.isfinite(float(normalizer)) or normalizer <= 0:
        raise ValueError(
            f"normalizer must be finite and > 0 (the global number of masked tokens or sequences), got {normalizer}"
        )
    return float(normalizer)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    clip_low: Number | None = None,
    clip_high: Number | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: Number = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: Number = 0.0,
    agg: str = "token_mean",
    normalizer: Number | torch.Tensor | None = None,
    token_sum_constant: Number | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: Number | None = None,
    tis_mode: str = "truncate",
    dual_clip: Number | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss to MINIMISE, plus detached metrics (paper-notes Sec. 2).

    Per token, with ratio ``r = exp(logprobs - old_logprobs)`` and advantage ``A``:

    * ``grpo`` / ``dapo``: ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)`` (PPO clip).
      Defaults: grpo (0.2, 0.2); dapo clip-higher (0.2, 0.28).
    * ``cispo``: ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logprobs``; defaults (1.0, 5.0), i.e.
      the IS weight is clipped to [0, 6] and carries no gradient (sg = stop-gradient).

    plus ``kl_coef * k3(logprobs, ref_logprobs)`` and minus ``entropy_coef * entropy``.

    Truncated importance sampling (``tis_cap``; Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"): the samples come from the rollout engine
    (``rollout_logprobs``, e.g. vLLM in bf16), not from pi_old as the learner computes it, so each
    token's policy-gradient term is multiplied by the constant ``w = min(exp(old_logprobs -
    rollout_logprobs), tis_cap)``, correcting the engine/learner mismatch with a bounded weight. The
    KL and entropy terms are not weighted. Off (``tis_cap=None``) the loss is exactly as above.
    The same weight corrects staleness when the samples came from an older policy (the off-policy
    trainer modes): the rollout log-probs are then the behaviour policy's. ``tis_mode="mask"``
    (masked IS) instead drops the policy-gradient term of every token whose weight exceeds the cap
    (weight 0) and keeps ``w`` elsewhere.

    Dual clip (``dual_clip = c > 1``, Ye et al. 2020, as in verl): for a negative advantage the PPO
    term ``max(-r A, -clip(r) A)`` grows without bound as ``r`` grows; it is capped at ``-c A``, so a
    token far off-policy cannot dominate the batch. Positive advantages are unchanged; grpo/dapo only.

    Aggregation (``agg``), each "sum of per-row terms / normalizer":

    * ``token_mean`` (paper): sum of masked per-token losses / normalizer; default normalizer = masked
      tokens in this call. Pass the global masked-token count to make micro-batches add up exactly.
    * ``seq_mean_token_mean``: per-row mean over its masked tokens, summed / normalizer; default =
      rows with >= 1 masked token in this call (pass the global count for exact micro-batching).
    * ``seq_mean_token_sum_norm`` (Dr.GRPO): per-row masked token SUM / ``token_sum_constant``
      (required, e.g. the max response length), summed / normalizer; default = rows with >= 1
      masked token in this call.

    Args:
        logprobs: ``[N, T]`` current-policy token log-probs (requires grad).
        old_logprobs: ``[N, T]`` log-probs under pi_old (detached here).
        advantages: ``[N]`` (one per sequence, broadcast over its tokens) or ``[N, T]`` (detached).
        response_mask: ``[N, T]`` bool (0/1 integers accepted), True where a token counts.
        loss_type: ``"grpo" | "dapo" | "cispo"``.
        clip_low / clip_high: the epsilons ``eps_low`` / ``eps_high`` (>= 0); ``None`` = type default.
        ref_logprobs: ``[N, T]`` reference-policy log-probs, required when ``kl_coef > 0``.
        kl_coef: weight of the k3 KL penalty (paper: 0).
        entropy: ``[N, T]`` per-token entropy (part of the graph), required when ``entropy_coef > 0``.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        agg: aggregation mode, see above.
        normalizer: positive number or scalar tensor overriding the default denominator.
        token_sum_constant: positive constant for ``seq_mean_token_sum_norm``.
        rollout_logprobs: ``[N, T]`` the sampler's log-probs of the same tokens (detached), required
            when ``tis_cap`` is set.
        tis_cap: truncation C >= 1 of the importance weight pi_old / pi_rollout; None = off.
        tis_mode: ``"truncate"`` (``min(w, C)``) or ``"mask"`` (``w``, and 0 where ``w > C``).
        dual_clip: the constant ``c > 1`` of the dual clip for negative advantages; None = off.

    Masked positions never contribute value or gradient, even if they hold inf/NaN-prone values
    (they are replaced by neutral values before any exp/log).

    Returns:
        ``(loss, metrics)``: ``loss`` is a 0-d tensor. ``metrics`` are python floats averaged over
        THIS call's masked tokens (combine micro-batches weighted by ``num_tokens``):
        ``pg_loss`` (mean per-token policy-gradient term), ``clip_fraction`` (PPO types: tokens
        where the clipped branch is strictly smaller, i.e. chosen and gradient-free; cispo: tokens
        whose IS weight was clipped), ``approx_kl`` (k3 estimate of KL(pi_old || pi):
        ``r - 1 - log r``), ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``num_tokens``,
        ``num_sequences`` (rows with >= 1 masked token), ``kl`` (if ``ref_logprobs``),
        ``entropy`` (if ``entropy``), ``tis_weight_mean`` and ``tis_clip_fraction`` (tokens whose
        weight was truncated; both if ``tis_cap``). With no masked token the means are 0.0 and the ratio
        extremes 1.0, and the loss is a graph-connected zero.

    Raises:
        ValueError: unknown ``loss_type``/``agg``, negative epsilons or coefficients, shape or
            dtype mismatches, missing ``ref_logprobs``/``entropy``/``token_sum_constant``,
            non-positive ``normalizer``, ``tis_cap`` < 1 or without ``rollout_logprobs``.
    """
    # ---- validation -------------------------------------------------------------------------
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    logprobs = _check_float_tensor("logprobs", logprobs)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [N, T], got {tuple(logprobs.shape)}")
    shape = logprobs.shape
    old_logprobs = _check_float_tensor("old_logprobs", old_logprobs, shape).detach()
    if not isinstance(response_mask, torch.Tensor) or tuple(response_mask.shape) != tuple(shape):
        got = tuple(response_mask.shape) if isinstance(response_mask, torch.Tensor) else type(response_mask).__name__
        raise ValueError(f"response_mask must be a tensor of shape {tuple(shape)}, got {got}")
    if response_mask.dtype != torch.bool:
        if response_mask.is_floating_point() or response_mask.is_complex():
            if bool(((response_mask != 0) & (response_mask != 1)).any()):
                raise ValueError("response_mask must be bool (True where a token counts) or hold only 0/1")
        elif bool(((response_mask != 0) & (response_mask != 1)).any()):
            raise ValueError("response_mask must be bool (True where a token counts) or hold only 0/1")
        response_mask = response_mask != 0
    advantages = _check_float_tensor("advantages", advantages).detach()
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages.unsqueeze(-1)  # one scalar per sequence, broadcast over its tokens
    elif tuple(advantages.shape) != tuple(shape):
        raise ValueError(
            f"advantages must have shape [N] = ({shape[0]},) or [N, T] = {tuple(shape)}, got {tuple(advantages.shape)}"
        )
    default_low, default_high = DEFAULT_CLIP[loss_type]
    eps_low = default_low if clip_low is None else _check_eps("clip_low", clip_low)
    eps_high = default_high if clip_high is None else _check_eps("clip_high", clip_high)
    kl_coef = _check_coef("kl_coef", kl_coef)
    entropy_coef = _check_coef("entropy_coef", entropy_coef)
    if ref_logprobs is not None:
        ref_logprobs = _check_float_tensor("ref_logprobs", ref_logprobs, shape).detach()
    elif kl_coef > 0:
        raise ValueError("kl_coef > 0 needs ref_logprobs=[N, T] reference log-probs (or set kl_coef=0)")
    if entropy is not None:
        entropy = _check_float_tensor("entropy", entropy, shape)
    elif entropy_coef > 0:
        raise ValueError("entropy_coef > 0 needs entropy=[N, T] per-token entropies (or set entropy_coef=0)")
    if tis_cap is not None:
        if (
            isinstance(tis_cap, bool)
            or not isinstance(tis_cap, (int, float))
            or not math.isfinite(float(tis_cap))
            or tis_cap < 1
        ):
            raise ValueError(f"tis_cap must be a finite number >= 1 (or None for off), got {tis_cap!r}")
        if rollout_logprobs is None:
            raise ValueError("tis_cap needs rollout_logprobs=[N, T], the sampler's log-probs (or set tis_cap=None)")
    if tis_mode not in ("truncate", "mask"):
        raise ValueError(f"tis_mode must be 'truncate' or 'mask', got {tis_mode!r}")
    if dual_clip is not None:
        if (
            isinstance(dual_clip, bool)
            or not isinstance(dual_clip, (int, float))
            or not math.isfinite(float(dual_clip))
            or dual_clip <= 1
        ):
            raise ValueError(
                f"dual_clip must be a finite number > 1 (3.0 is usual), or None for off, got {dual_clip!r}"
            )
        if loss_type == "cispo":
            raise ValueError("dual_clip applies to the PPO ratio terms of grpo/dapo, not to cispo")
    if rollout_logprobs is not None:
        rollout_logprobs = _check_float_tensor("rollout_logprobs", rollout_logprobs, shape).detach()
    if agg == "seq_mean_token_sum_norm":
        if token_sum_constant is None:
            raise ValueError(
                "agg='seq_mean_token_sum_norm' (Dr.GRPO) needs "
                "token_sum_constant=<constant, e.g. the max response length>"
            )
        if (
            isinstance(token_sum_constant, bool)
            or not isinstance(token_sum_constant, (int, float))
            or not math.isfinite(float(token_sum_constant))
            or token_sum_constant <= 0
        ):
            raise ValueError(f"token_sum_constant must be a finite number > 0, got {token_sum_constant!r}")
    if normalizer is not None:
        normalizer = _check_normalizer(normalizer)

    mask = response_mask
    maskf = mask.to(logprobs.dtype)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)

    # ---- per-token terms ----------------------------------------------------------------------
    # Neutralise masked positions BEFORE exp/log so padding garbage (e.g. -inf) cannot leak NaN into
    # the gradient through torch.where's unused branch.
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)
    ratio = torch.exp(log_ratio)
    if loss_type in ("grpo", "dapo"):
        clipped_ratio = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
        surr_unclipped = ratio * advantages
        surr_clipped = clipped_ratio * advantages
        pg = -torch.minimum(surr_unclipped, surr_clipped)  # PPO pessimistic bound (paper-notes Sec. 2)
        clip_active = surr_clipped < surr_unclipped
        if dual_clip is not None:
            cap = -float(dual_clip) * advantages  # > 0 where A < 0
            dual = (advantages < 0) & (pg > cap)
            pg = torch.where(dual, cap.expand_as(pg), pg)  # a constant there: no gradient, like a clip
            clip_active = clip_active | dual
    else:
        # CISPO: the clipped IS weight is a constant (stop-gradient); the gradient is REINFORCE's
        # grad log pi scaled by that weight, so every token keeps a gradient (paper-notes Sec. 2).
        is_weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high).detach()
        pg = -is_weight * advantages * torch.where(mask, logprobs, zero)
        clip_active = (ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)
    tis_w = None
    if tis_cap is not None:
        assert rollout_logprobs is not None  # checked above: tis_cap needs it
        # A constant per token (old and rollout log-probs carry no gradient); masked positions get 1.
        tis_w = torch.exp(torch.where(mask, old_logprobs - rollout_logprobs, zero))
        tis_clipped = tis_w > float(tis_cap)
        if tis_mode == "truncate":
            tis_w = torch.clamp(tis_w, max=float(tis_cap))
        else:
            tis_w = torch.where(tis_clipped, zero, tis_w)
        pg = pg * tis_w
    pg = torch.where(mask, pg, zero)
    per_token = pg
    kl_tok = None
    if ref_logprobs is not None:
        kl_tok = torch.where(
            mask, kl_k3(torch.where(mask, logprobs, zero), torch.where(mask, ref_logprobs, zero)), zero
        )
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl_tok
    ent_tok = None
    if entropy is not None:
        ent_tok = torch.where(mask, entropy, zero)
        if entropy_coef > 0:
            per_token = per_token - entropy_coef * ent_tok

    # ---- aggregation --------------------------------------------------------------------------
    tokens_per_row = maskf.sum(dim=-1)
    nonempty_rows = tokens_per_row > 0
    if agg == "token_mean":
        total = per_token.sum()
        default_norm = maskf.sum()
    else:
        row_sum = per_token.sum(dim=-1)
        if agg == "seq_mean_token_mean":
            row_term = row_sum / tokens_per_row.clamp(min=1.0)  # empty rows have row_sum == 0
        else:
            assert token_sum_constant is not None  # checked above for this mode
            row_term = row_sum / float(token_sum_constant)  # Dr.GRPO: constant, length-unbiased
        total = row_term.sum()
        default_norm = nonempty_rows.to(logprobs.dtype).sum()
    denom: float | torch.Tensor
    if normalizer is None:
        denom = default_norm.clamp(min=1.0)  # empty call: zero loss still attached to the graph
    else:
        denom = normalizer
    loss = total / denom

    # ---- metrics (detached, one host sync) -----------------------------------------------------
    with torch.no_grad():
        n_tok = maskf.sum()
        safe_n = n_tok.clamp(min=1.0)
        has_tok = n_tok > 0
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        big = torch.full((), float("inf"), dtype=ratio.dtype, device=ratio.device)
        approx_kl = torch.where(mask, ratio - 1.0 - log_ratio, zero)  # k3 of KL(pi_old || pi)
        values = [
            (pg.detach().sum() / safe_n),
            (clip_active & mask).to(ratio.dtype).sum() / safe_n,
            approx_kl.sum() / safe_n,
            torch.where(mask, ratio, zero).sum() / safe_n,
            torch.where(has_tok, torch.where(mask, ratio, big).min(), one),
            torch.where(has_tok, torch.where(mask, ratio, -big).max(), one),
            n_tok,
            nonempty_rows.to(ratio.dtype).sum(),
        ]
        names = [
            "pg_loss",
            "clip_fraction",
            "approx_kl",
            "ratio_mean",
            "ratio_min",
            "ratio_max",
            "num_tokens",
            "num_sequences",
        ]
        if kl_tok is not None:
            values.append(kl_tok.detach().sum() / safe_n)
            names.append("kl")
        if ent_tok is not None:
            values.append(ent_tok.detach().sum() / safe_n)
            names.append("entropy")
        if tis_w is not None:
            values += [
                torch.where(has_tok, torch.where(mask, tis_w, zero).sum() / safe_n, one),
                (tis_clipped & mask).to(ratio.dtype).sum() / safe_n,
            ]
            names += ["tis_weight_mean", "tis_clip_fraction"]
        floats = torch.stack([v.to(ratio.dtype).reshape(()) for v in values]).tolist()
    metrics = dict(zip(names, floats))
    return loss, metrics
