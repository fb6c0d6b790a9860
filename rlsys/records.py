"""Typed records that cross process boundaries (driver <-> Ray actors).

Every message between the driver and an actor is one of these frozen dataclasses, never a dict of
strings. Per-token arrays are numpy (cheap to ship through Ray's object store, zero-copy on read).

Names: B prompts per step, G rollouts per prompt (the paper's group size N), T tokens,
P prompt tokens, L = P + T padded sequence length. ``response_mask`` is True where a token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Reasons a grade can carry; the reward pool counts each of them per step.
GRADE_OK = "ok"
GRADE_TIMEOUT = "timeout"  # the verifier did not answer within its wall-clock limit (killed)
GRADE_ERROR = "error"  # the verifier raised or its process died
GRADE_INVALID = "invalid"  # the verifier returned something that is not a finite reward
GRADE_STATUSES = (GRADE_OK, GRADE_TIMEOUT, GRADE_ERROR, GRADE_INVALID)


@dataclass(frozen=True)
class PromptRow:
    """One dataset row: what to ask and how to grade it.

    ``prompt_id`` is unique across the dataset and is how every later record is joined back to
    its prompt (never by position alone). ``messages`` is a chat: ((role, content), ...).
    ``verifier`` names how to grade: a built-in ("math", "exact", "regex") or "module:function".
    """

    prompt_id: str
    messages: tuple[tuple[str, str], ...]
    answer: str
    verifier: str
    task: str = ""
    meta: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RolloutRequest:
    """A prompt for a rollout worker, tokenized once by the driver."""

    prompt_id: str
    prompt_token_ids: tuple[int, ...]  # [P]


@dataclass(frozen=True)
class Completion:
    """One sampled response."""

    token_ids: np.ndarray  # [T_i] int32, response tokens only (EOS included when sampled)
    logprobs: np.ndarray  # [T_i] float32, log pi_rollout(token) at sampling time
    text: str  # decoded response (special tokens skipped)
    finish_reason: str  # "stop" (EOS / stop string) or "length" (hit max_tokens)
    # ((weight version, start, end), ...): tokens [start, end) were sampled by that version. One span
    # from a synchronous engine; more when a weight update landed while the completion was in flight
    # (the async engine). Empty: unrecorded (then the group's weight_version sampled every token).
    version_spans: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class RolloutGroup:
    """G completions of one prompt, sampled with weights ``weight_version`` (the oldest version that
    sampled any of its tokens; per-token versions in each completion's ``version_spans``)."""

    prompt_id: str
    prompt_token_ids: tuple[int, ...]  # [P]
    completions: tuple[Completion, ...]  # [G]
    weight_version: int
    worker_id: int


@dataclass(frozen=True)
class GradeRequest:
    """One completion to grade against the prompt's reference answer."""

    prompt_id: str
    sample_index: int  # position of the completion inside its group, 0..G-1
    completion: str
    answer: str
    verifier: str


@dataclass(frozen=True)
class Grade:
    """The verdict for one completion.

    ``reward`` is always finite (a failed verifier yields 0.0 with a non-"ok" ``status``);
    ``correct`` is the verifier's success flag, which the focal weight's success rate uses.
    """

    prompt_id: str
    sample_index: int
    reward: float
    correct: bool
    status: str = GRADE_OK  # one of GRADE_STATUSES
    detail: str = ""  # short reason for a non-"ok" status (truncated, safe to log)
    seconds: float = 0.0


@dataclass(frozen=True)
class TrainBatch:
    """One learner's share of a step's training data.

    All [N, L] arrays are aligned with ``input_ids``: the value at position t concerns token t
    (its logprob is computed from the logits at t - 1). Rows are prompt + response, right-padded.
    Padding rows (to give every data-parallel rank the same number of micro-batches) have an
    all-False ``response_mask`` and contribute nothing.
    """

    input_ids: np.ndarray  # [N, L] int64
    attention_mask: np.ndarray  # [N, L] bool
    response_mask: np.ndarray  # [N, L] bool, True at response tokens that count in the loss
    advantages: np.ndarray  # [N] float32, focal-weighted group advantages
    rollout_logprobs: np.ndarray  # [N, L] float32, the rollout engine's logprobs (0 off-response)
    loss_normalizer: float  # shared by every micro-batch and rank so the pieces sum to the full loss
    # [N, L] float32, log pi_old (0 off-response): the policy before this rollout batch's first
    # update, computed once when several optimizer steps share the batch. None: pi_old is each
    # micro-batch's own forward pass, detached (one step per batch; the PPO ratio is exactly 1).
    old_logprobs: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, length = self.input_ids.shape
        for name in ("attention_mask", "response_mask", "rollout_logprobs", "old_logprobs"):
            if getattr(self, name) is not None and getattr(self, name).shape != (n, length):
                raise ValueError(f"TrainBatch.{name} has shape {getattr(self, name).shape}, expected {(n, length)}")
        if self.advantages.shape != (n,):
            raise ValueError(f"TrainBatch.advantages has shape {self.advantages.shape}, expected {(n,)}")
        if not self.loss_normalizer > 0:
            raise ValueError(f"TrainBatch.loss_normalizer must be > 0, got {self.loss_normalizer}")

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class TrainStats:
    """What one optimizer step on the learners reports: GLOBAL numbers, identical on every rank.

    Means are token-weighted over all ranks' response tokens; ``loss`` is the global loss (the sum
    of every micro-batch loss); ``ratio_*`` are importance ratios pi_theta / pi_old (1 with no
    response token). The optional fields are None where the step did not compute them: ``kl``
    without a reference policy (``kl_coef`` 0), ``tis_*`` without truncated importance sampling
    (``tis_cap`` None); the learner always fills the others (None only in hand-built stats).
    """

    loss: float
    pg_loss: float
    clip_fraction: float
    approx_kl: float
    entropy: float
    grad_norm: float
    lr: float
    num_tokens: int
    rollout_logprob_diff: float  # mean |log pi_learner_old - log pi_rollout| over response tokens
    ratio_max: float
    skipped: bool = False  # True when the step was skipped for non-finite loss/gradients
    seconds: float = 0.0  # wall-clock of the whole step on this rank
    ratio_mean: float | None = None
    ratio_min: float | None = None
    kl: float | None = None  # mean k3 estimate of KL(pi_theta || pi_ref) over response tokens, before the update
    tis_weight_mean: float | None = None  # mean truncated IS weight min(pi_old / pi_rollout, cap)
    tis_clip_fraction: float | None = None  # fraction of response tokens whose IS weight hit the cap
    num_sequences: int | None = None  # rows with at least one response token, all ranks
    num_micro_batches: int | None = None  # per rank (every rank runs the same number)
    applied_steps: int | None = None  # optimizer steps applied so far, this one included unless skipped
    old_logprob_seconds: float | None = None  # wall-clock of the no-grad passes before the update (pi_ref)
    num_updates: int = 1  # optimizer steps these stats cover (trainer.mini_batches * trainer.epochs)

    @staticmethod
    def combine(updates: Sequence[TrainStats]) -> TrainStats:
        """One step's stats from its PPO updates (in order): token-weighted means of the per-token
        metrics, ``loss`` and ``grad_norm`` averaged over updates, ratio extremes over all, counts and
        seconds summed, ``lr`` and ``applied_steps`` of the last, ``skipped`` if any update was. One
        update is returned as it is."""
        if not updates:
            raise ValueError("TrainStats.combine: no updates")
        if len(updates) == 1:
            return updates[0]
        tok = [u.num_tokens for u in updates]
        total = sum(tok)

        def tw(values: Sequence[float]) -> float:  # token-weighted mean over the updates
            return sum(v * n for v, n in zip(values, tok)) / total if total else values[-1]

        def tw_opt(name: str) -> float | None:  # None if any update did not compute it
            values = [getattr(u, name) for u in updates]
            return None if any(v is None for v in values) else tw(values)

        def sum_opt(name: str) -> Any:
            values = [getattr(u, name) for u in updates]
            return None if any(v is None for v in values) else sum(values)

        mins = [u.ratio_min for u in updates if u.ratio_min is not None]
        last = updates[-1]
        return TrainStats(
            loss=sum(u.loss for u in updates) / len(updates),
            pg_loss=tw([u.pg_loss for u in updates]),
            clip_fraction=tw([u.clip_fraction for u in updates]),
            approx_kl=tw([u.approx_kl for u in updates]),
            entropy=tw([u.entropy for u in updates]),
            grad_norm=sum(u.grad_norm for u in updates) / len(updates),
            lr=last.lr,
            num_tokens=total,
            rollout_logprob_diff=tw([u.rollout_logprob_diff for u in updates]),
            ratio_max=max(u.ratio_max for u in updates),
            skipped=any(u.skipped for u in updates),
            seconds=sum(u.seconds for u in updates),
            ratio_mean=tw_opt("ratio_mean"),
            ratio_min=min(mins) if len(mins) == len(updates) else None,
            kl=tw_opt("kl"),
            tis_weight_mean=tw_opt("tis_weight_mean"),
            tis_clip_fraction=tw_opt("tis_clip_fraction"),
            num_sequences=sum_opt("num_sequences"),
            num_micro_batches=sum_opt("num_micro_batches"),
            applied_steps=last.applied_steps,
            old_logprob_seconds=sum_opt("old_logprob_seconds"),
            num_updates=sum(u.num_updates for u in updates),
        )

    def update_row(self) -> dict[str, float]:
        """This update's row of ``updates.jsonl`` (rlsys.metrics.MetricsLogger.log_updates)."""
        return {
            "loss": self.loss,
            "clip_fraction": self.clip_fraction,
            "ratio_min": self.ratio_min if self.ratio_min is not None else float("nan"),
            "ratio_mean": self.ratio_mean if self.ratio_mean is not None else float("nan"),
            "ratio_max": self.ratio_max,
            "approx_kl": self.approx_kl,
            "grad_norm": self.grad_norm,
            "lr": self.lr,
            "tokens": self.num_tokens,
            "skipped": int(self.skipped),
        }

    def metrics(self) -> dict[str, float]:
        """The ``train/*`` metrics the driver logs for this step (docs/metrics.md lists each key).

        ``train/tis_*`` only when truncated IS ran, ``train/kl`` only when the KL to the reference
        policy was computed; the rest always. Counts stay ints (``train/tokens``, ``train/skipped``).
        """
        m: dict[str, float] = {
            "train/loss": self.loss,
            "train/pg_loss": self.pg_loss,
            "train/clip_fraction": self.clip_fraction,
            "train/grad_norm": self.grad_norm,
            "train/entropy": self.entropy,
            "train/approx_kl": self.approx_kl,
            "train/lr": self.lr,
            "train/ratio_max": self.ratio_max,
            "train/rollout_logprob_diff": self.rollout_logprob_diff,
            "train/tokens": self.num_tokens,
            "train/skipped": int(self.skipped),
            "train/updates": self.num_updates,
        }
        if self.ratio_min is not None:
            m["train/ratio_min"] = self.ratio_min
        for name in ("tis_weight_mean", "tis_clip_fraction", "kl"):
            value = getattr(self, name)
            if value is not None:
                m[f"train/{name}"] = value
        return m
