"""Config: composition from conf/, typed rejection of bad keys/types, value validation naming the key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from rlsys.config import ConfigError, RLConfig, absolute_paths, register_configs, to_dataclass, validate

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


def make(*overrides: str) -> RLConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_dataclass(compose("config", overrides=["run.output_dir=/tmp/x", *overrides]))


def test_default_is_f_grpo_with_paper_gamma():
    cfg = make()
    validate(cfg)
    assert (cfg.algo.name, cfg.algo.loss_type, cfg.algo.gamma) == ("f_grpo", "grpo", 0.5)
    assert cfg.logger.wandb_mode == "offline" and cfg.cluster.address is None


@pytest.mark.parametrize(
    "algo,loss,gamma,dyn",
    [
        ("grpo", "grpo", 0.0, False),
        ("f_grpo", "grpo", 0.5, False),
        ("dapo", "dapo", 0.0, True),
        ("f_dapo", "dapo", 0.5, True),
        ("cispo", "cispo", 0.0, False),
        ("f_cispo", "cispo", 0.5, False),
        ("rloo", "grpo", 0.0, False),
        ("f_rloo", "grpo", 0.5, False),
        ("maxrl", "grpo", 0.0, False),
        ("f_maxrl", "grpo", 0.5, False),
    ],
)
def test_algo_groups(algo, loss, gamma, dyn):
    cfg = make(f"algo={algo}")
    validate(cfg)
    assert (cfg.algo.name, cfg.algo.loss_type, cfg.algo.gamma, cfg.algo.dynamic_sampling) == (algo, loss, gamma, dyn)


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="totl_steps"):
        make("trainer.totl_steps=3")
    with pytest.raises(ConfigCompositionException, match="total_steps"):
        make("trainer.total_steps=many")


@pytest.mark.parametrize(
    "override,key",
    [
        ("algo.group_size=1", "algo.group_size"),
        ("algo.gamma=-0.5", "algo.gamma"),
        ("algo.agg=sum", "algo.agg"),
        ("learner.zero_stage=4", "learner.zero_stage"),
        ("logger.wandb_mode=loud", "logger.wandb_mode"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("rollout.vllm_log_level=info", "rollout.vllm_log_level"),
        ("algo.tis_cap=0.5", "algo.tis_cap"),
        ("model.path=/does/not/exist", "model.path"),
        ("trainer.total_steps=0", "trainer.total_steps"),
        ("sync.max_logprob_diff=0", "sync.max_logprob_diff"),
        ("trainer.mini_batches=0", "trainer.mini_batches"),
        ("trainer.mini_batches=64", "trainer.mini_batches"),  # more than prompts_per_step (32)
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.mode=overlap", "trainer.mode"),
        ("trainer.max_staleness=0", "trainer.max_staleness"),
        ("algo.is_correction=clip", "algo.is_correction"),
        ("algo.dual_clip=1.0", "algo.dual_clip"),
        ("algo.std=bessel", "algo.std"),
        ("algo.std_scope=global", "algo.std_scope"),
        ("algo.advantage=rloo", "algo.advantage"),  # without its group (algo=rloo)
    ],
)
def test_invalid_values_name_the_key(override, key):
    cfg = make(override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_impossible_combinations():
    with pytest.raises(ConfigError, match=r"algo\.gamma.*algo=f_grpo"):
        validate(make("algo=grpo", "algo.gamma=0.5"))
    with pytest.raises(ConfigError, match=r"algo\.clip_high"):
        validate(make("algo=dapo", "algo.clip_low=0.3", "algo.clip_high=0.2"))
    with pytest.raises(ConfigError, match=r"algo\.loss_type"):
        validate(make("algo.name=dapo"))  # name alone without its group
    with pytest.raises(ConfigError, match=r"learner\.num_workers"):
        validate(make("learner.num_workers=8"), available_cpus=4)
    validate(make("learner.num_workers=2"), available_cpus=4)


def test_objective_combinations():
    assert make("algo=rloo").algo.advantage == "rloo"
    with pytest.raises(ConfigError, match=r"algo\.std_normalize"):
        validate(make("algo=maxrl", "algo.std_normalize=true"))
    with pytest.raises(ConfigError, match=r"algo\.dual_clip.*cispo"):
        validate(make("algo=cispo", "algo.dual_clip=3.0"))
    validate(make("algo=f_dapo", "algo.dual_clip=3.0", "algo.std=sample", "algo.std_scope=batch"))


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ((), ("off", None)),
        (("algo.tis_cap=3.0",), ("truncate", 3.0)),
        (("trainer.mode=one_step_off",), ("truncate", 2.0)),
        (("trainer.mode=async", "algo.is_correction=mask"), ("mask", 2.0)),
        (("trainer.mode=async", "algo.is_correction=off"), ("off", None)),
        (("algo.is_correction=truncate", "algo.tis_cap=1.5"), ("truncate", 1.5)),
    ],
)
def test_importance_correction_is_on_by_default_off_policy(overrides, expected):
    from rlsys.build import learner_spec
    from rlsys.config import importance_correction

    cfg = make(*overrides)
    validate(cfg)
    assert importance_correction(cfg) == expected
    spec = learner_spec(cfg, "/m")
    assert (spec.tis_cap, spec.tis_mode) == (expected[1], "mask" if expected[0] == "mask" else "truncate")


def test_model_path_must_be_a_causal_lm_with_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    with pytest.raises(ConfigError, match=r"model\.path.*ForCausalLM"):
        validate(make(f"model.path={tmp_path}"))
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    with pytest.raises(ConfigError, match=r"model\.path.*no weight files"):
        validate(make(f"model.path={tmp_path}"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    validate(make(f"model.path={tmp_path}"))


def test_a_default_local_cluster_fits_the_default_actors_on_a_small_machine(monkeypatch):
    import os

    from rlsys.config import local_cluster_cpus, requested_cpus

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = make()
    assert requested_cpus(cfg) == 2.5  # rollout 1 + learner 1 + reward 0.5
    assert local_cluster_cpus(cfg) == 3
    validate(cfg, available_cpus=local_cluster_cpus(cfg))
    with pytest.raises(ConfigError, match=r"cluster\.num_cpus"):  # an explicit size is respected
        validate(make("cluster.num_cpus=2"), available_cpus=local_cluster_cpus(make("cluster.num_cpus=2")))


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    """Paths reach Ray actors, whose working directory is not the driver's: every entry point makes
    them absolute against the caller's directory first (Hydra apps via to_dataclass)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = make(
        "run.output_dir=out/run",
        "model.path=ckpt",
        "data.path='~/d.jsonl'",
        "eval.output_dir=ev",
        "sft.output_dir=../sft",
        "difficulty.output_dir=/abs/diff",
    )
    assert cfg.run.output_dir == str(tmp_path / "out" / "run")
    assert cfg.model.path == str(tmp_path / "ckpt")
    assert cfg.data.path == str(tmp_path / "home" / "d.jsonl")
    assert cfg.eval.output_dir == str(tmp_path / "ev")
    assert cfg.sft.output_dir == str(tmp_path.parent / "sft")
    assert cfg.difficulty.output_dir == "/abs/diff"
    plain = RLConfig()
    plain.run.output_dir = "rel"
    fixed = absolute_paths(plain)
    assert fixed.run.output_dir == str(tmp_path / "rel") and plain.run.output_dir == "rel"  # a copy
    assert fixed.model.path is None and fixed.sft.output_dir is None  # unset stays unset
    assert absolute_paths(fixed) == fixed  # idempotent


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_tokens", 0, "invalid config eval.max_tokens=0: must be >= 1 (or null for rollout.max_tokens)"),
        (
            "max_prompts_per_call",
            0,
            "invalid config eval.max_prompts_per_call=0: must be >= 1 (or null for automatic chunking)",
        ),
    ],
)
def test_eval_sampling_keys_are_checked_by_validate_for_every_job(key, value, message):
    """In-training evaluation reads eval.max_prompts_per_call too, so validate (not only rlsys.eval) checks them."""
    import dataclasses

    cfg = RLConfig()
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **{key: value}))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == message


def test_data_num_test_is_gone_because_jobs_size_their_held_out_rows():
    from rlsys.config import DataConfig

    assert not hasattr(DataConfig(), "num_test")


def test_sync_transport_resolves_auto_and_refuses_vllms_cuda_engines_on_cpu():
    from rlsys.config import sync_transport

    cfg = make()
    validate(cfg)
    assert cfg.sync.transport == "auto" and sync_transport(cfg) == ("torchdist", "gloo")
    assert sync_transport(make("sync.transport=object_store")) == ("object_store", "")
    gpu = make("sync.transport=torchdist", "rollout.num_gpus_per_worker=1")
    assert sync_transport(gpu) == ("torchdist", "nccl")
    for name in ("nccl", "ipc"):
        with pytest.raises(ConfigError, match=rf"sync.transport='{name}'.*CUDA only.*num_gpus_per_worker=0"):
            validate(make(f"sync.transport={name}"))
    with pytest.raises(ConfigError, match="sync.transport='gloo'.*choose one of auto, torchdist"):
        validate(make("sync.transport=gloo"))
    with pytest.raises(ConfigError, match="sync.piece_mb"):
        validate(make("sync.piece_mb=0"))


def test_rollout_executor_follows_tensor_parallel_size_and_refuses_what_cannot_work():
    from rlsys.config import rollout_executor

    assert rollout_executor(make()) == "uni"
    assert rollout_executor(make("rollout.tensor_parallel_size=2")) == "mp"
    assert rollout_executor(make("rollout.executor=mp")) == "mp"
    validate(make("rollout.tensor_parallel_size=2"))
    with pytest.raises(ConfigError, match=r"rollout.executor='uni'.*needs rollout.executor=mp"):
        validate(make("rollout.tensor_parallel_size=2", "rollout.executor=uni"))
    with pytest.raises(ConfigError, match=r"rollout.executor='thread'.*choose one of auto, uni, mp"):
        validate(make("rollout.executor=thread"))
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size"):
        validate(make("rollout.tensor_parallel_size=0"))
    with pytest.raises(ConfigError, match=r"sync.transport='object_store'.*cannot reach.*torchdist"):
        validate(make("rollout.tensor_parallel_size=2", "sync.transport=object_store"))
    validate(make("rollout.engine=async"))
    tp2, aio = make("rollout=tp2"), make("rollout=async")  # the config groups users select
    validate(tp2), validate(aio)
    assert rollout_executor(tp2) == "mp" and tp2.rollout.tensor_parallel_size == 2
    assert aio.rollout.engine == "async" and rollout_executor(aio) == "uni"
    with pytest.raises(ConfigError, match=r"rollout.engine='vllm'.*choose one of llm, async"):
        validate(make("rollout.engine=vllm"))
    with pytest.raises(ConfigError, match=r"sync.transport='object_store'.*rollout.engine=async.*torchdist"):
        validate(make("rollout.engine=async", "sync.transport=object_store"))
    with pytest.raises(ConfigError, match=r"rollout.num_gpus_per_worker=1.*one GPU per TP rank"):
        validate(make("rollout.tensor_parallel_size=2", "rollout.num_gpus_per_worker=1"))


def test_a_sweep_job_is_grouped_named_and_tagged_by_its_overrides_unless_set():
    from rlsys.config import RLConfig, sweep_labels

    cfg = sweep_labels(RLConfig(), "/x/multirun/fgrpo/", ["algo=grpo", "trainer.seed=1", "+data.limit=8"])
    assert cfg.run.group == "fgrpo"
    assert cfg.run.name == "+data.limit=8,algo=grpo,trainer.seed=1"
    assert cfg.run.tags == ["algo", "trainer.seed", "data.limit"]
    mine = RLConfig()
    mine.run.group, mine.run.name, mine.run.tags = "mine", "my-run", ["paper"]
    kept = sweep_labels(mine, "/x/sweep", ["algo=grpo"])
    assert (kept.run.group, kept.run.name, kept.run.tags) == ("mine", "my-run", ["paper", "algo"])
    assert RLConfig().run.tags == []  # the default is not shared or changed
