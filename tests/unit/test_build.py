"""rlsys.build, the one config -> objects module: specs carry the config, and start_actors never leaks
an actor group (fake groups, no Ray)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rlsys import build
from rlsys.config import RLConfig
from rlsys.records import PromptRow


def _cfg(**sections) -> RLConfig:
    cfg = RLConfig()
    for name, values in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)})
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))


class FakeGroup:
    """Stands in for a started actor group; records its construction and its shutdown."""

    events: list[str] = []
    fail_on: set[str] = set()

    def __init__(self, kind: str, *args, **kwargs) -> None:
        if kind in FakeGroup.fail_on:
            raise RuntimeError(f"{kind} failed to start")
        self.kind, self.args, self.kwargs = kind, args, kwargs
        self.num_workers = 1
        self.ready_info = [{"dtype": "float32", "threads": 1}]
        FakeGroup.events.append(f"start {kind}")

    def validate_specs(self, specs) -> None:
        FakeGroup.events.append(f"validate {list(specs)}")

    def load_state(self, path: str) -> None:
        FakeGroup.events.append(f"load_state {Path(path).name}")

    def describe(self) -> list[dict]:
        return [{"dtype": "float32", "threads": 1}]

    def shutdown(self) -> None:
        FakeGroup.events.append(f"stop {self.kind}")


@pytest.fixture
def fake_groups(monkeypatch):
    FakeGroup.events = []
    FakeGroup.fail_on = set()
    monkeypatch.setattr(build, "make_reward_pool", lambda cfg: FakeGroup("reward", cfg))
    monkeypatch.setattr(build, "make_learner_group", lambda cfg, spec, init_dir=None: FakeGroup("learners", spec))

    def rollout_pool(cfg, path, **kw):
        FakeGroup.events.append(f"rollout transport {kw.get('transport')}")
        return FakeGroup("rollout", path)

    def weight_path(cfg, learners, rollout):
        if "weights" in FakeGroup.fail_on:
            raise RuntimeError("weights failed to start")
        FakeGroup.events.append(f"weights {learners.kind} -> {rollout.kind}")
        return "the weight path"

    monkeypatch.setattr(build, "make_rollout_pool", rollout_pool)
    monkeypatch.setattr(build, "make_weight_path", weight_path)
    monkeypatch.setattr(build, "learner_spec", lambda cfg, path: ("spec", path))
    return FakeGroup


def test_start_actors_starts_in_order_and_shuts_down_rollout_reward_learners(fake_groups, tmp_path):
    with build.start_actors(_cfg(), "/m", None, tmp_path, verifiers=["math", "exact", "math"]) as actors:
        assert [actors.reward.kind, actors.learners.kind, actors.rollout.kind] == ["reward", "learners", "rollout"]
        assert actors.rollout.args == ("/m",)
        events = fake_groups.events
        # The reward pool checks the verifiers before anything heavy starts; then the learners (here)
        # and the engines (on a thread) start side by side, in either order.
        assert events[:2] == ["start reward", "validate ['exact', 'math']"]
        assert sorted(events[2:5]) == ["rollout transport torchdist", "start learners", "start rollout"]
        assert events.index("rollout transport torchdist") < events.index("start rollout")  # sync.transport=auto
        assert events[5:] == ["weights learners -> rollout"]  # the groups are formed once both ends are up
        assert actors.weights == "the weight path"
    assert fake_groups.events[-3:] == ["stop rollout", "stop reward", "stop learners"]


def test_start_actors_resume_loads_learner_state_and_serves_the_checkpoint(fake_groups, tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_000002"
    with build.start_actors(_cfg(), "/m", ckpt, tmp_path) as actors:
        assert actors.rollout.args == (str(ckpt),)
    from rlsys.checkpoint import LEARNER_STATE_DIR

    events = fake_groups.events
    loaded = events.index(f"load_state {LEARNER_STATE_DIR}")
    assert events.index("start learners") < loaded < events.index("weights learners -> rollout")


@pytest.mark.parametrize(
    "failing, stopped",
    [
        ("learners", ["stop rollout", "stop reward"]),  # the engines started meanwhile are stopped too
        ("rollout", ["stop reward", "stop learners"]),
        ("weights", ["stop rollout", "stop reward", "stop learners"]),
    ],
)
def test_a_start_up_failure_shuts_down_every_group_already_started(fake_groups, tmp_path, failing, stopped):
    fake_groups.fail_on = {failing}
    with (
        pytest.raises(RuntimeError, match=f"{failing} failed to start"),
        build.start_actors(_cfg(), "/m", None, tmp_path),
    ):
        pytest.fail("the body must not run")
    assert [e for e in fake_groups.events if e.startswith("stop")] == stopped


def test_an_error_in_the_body_shuts_down_all_three(fake_groups, tmp_path):
    with pytest.raises(KeyError), build.start_actors(_cfg(), "/m", None, tmp_path):
        raise KeyError("boom")
    assert fake_groups.events[-3:] == ["stop rollout", "stop reward", "stop learners"]


def test_one_failing_shutdown_does_not_skip_the_others(fake_groups, tmp_path, monkeypatch):
    def bad_shutdown(self):
        FakeGroup.events.append(f"stop {self.kind}")
        if self.kind == "rollout":
            raise RuntimeError("rollout would not stop")

    monkeypatch.setattr(FakeGroup, "shutdown", bad_shutdown)
    with pytest.raises(RuntimeError, match="would not stop"), build.start_actors(_cfg(), "/m", None, tmp_path):
        pass
    assert fake_groups.events[-3:] == ["stop rollout", "stop reward", "stop learners"]


# ---- config reaches the specs and pools -------------------------------------------------------------


class Recorder:
    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs
        self.num_workers = args[1] if len(args) > 1 else 1

    def validate_specs(self, specs) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture
def recorded_pools(monkeypatch):
    import rlsys.workers.reward as reward
    import rlsys.workers.rollout as rollout

    monkeypatch.setattr(rollout, "RolloutPool", Recorder)
    monkeypatch.setattr(reward, "RewardGroup", Recorder)


def test_rollout_pools_of_every_job_carry_rollout_max_restarts(recorded_pools):
    cfg = _cfg(rollout=dict(max_restarts=7, timeout_s=12.0, num_workers=2), sync=dict(timeout_s=45.0))
    # rlsys.eval / rlsys.difficulty (eval_pools) and the SFT evaluation (one worker, sft.seed) come here.
    for pool in (
        build.make_rollout_pool(cfg, "/m", temperature=0.5, max_tokens=9),
        build.make_rollout_pool(cfg, "/m", num_workers=1, seed=5),
        build.make_rollout_pool(cfg, "/m"),
    ):
        assert pool.kwargs["max_restarts"] == 7
        assert pool.kwargs["timeout_s"] == 12.0
        assert pool.kwargs["sync_timeout_s"] == cfg.sync.timeout_s == 45.0
    spec = build.make_rollout_pool(cfg, "/m", temperature=0.5, max_tokens=9).args[0]
    assert (spec.temperature, spec.max_tokens, spec.model_path) == (0.5, 9, "/m")
    one = build.make_rollout_pool(cfg, "/m", num_workers=1, seed=5)
    assert one.args[1] == 1 and one.args[0].seed == 5


def test_reward_spec_carries_reward_max_restarts(recorded_pools):
    cfg = _cfg(reward=dict(max_restarts=0, num_workers=2, allowed_functions=["m:f"]))
    spec = build.reward_spec(cfg)
    assert spec.max_restarts == 0 and spec.num_workers == 2 and spec.allowed_functions == ("m:f",)
    assert build.make_reward_pool(cfg).args[0] == spec


def test_eval_pools_carry_both_max_restarts(recorded_pools):
    cfg = _cfg(rollout=dict(max_restarts=5), reward=dict(max_restarts=4))
    rows = [PromptRow("p0", (("user", "q"),), "1", "math")]
    with build.eval_pools(cfg, "/m", rows, temperature=0.7, max_tokens=8) as (rollout, reward):
        assert rollout.kwargs["max_restarts"] == 5
        assert rollout.args[0].temperature == 0.7 and rollout.args[0].max_tokens == 8
        assert reward.args[0].max_restarts == 4


def test_eval_difficulty_and_sft_build_through_rlsys_build():
    import rlsys.difficulty
    import rlsys.eval
    import rlsys.sft

    assert rlsys.eval.eval_pools is build.eval_pools
    assert rlsys.eval.make_rollout_pool is build.make_rollout_pool
    assert rlsys.eval.make_reward_pool is build.make_reward_pool
    assert rlsys.difficulty.eval_pools is build.eval_pools
    assert rlsys.sft.make_rollout_pool is build.make_rollout_pool
    assert rlsys.sft.make_learner_group is build.make_learner_group


def test_learner_spec_takes_every_value_from_the_config():
    cfg = _cfg(
        learner=dict(lr=3e-4, micro_batch_size=5, warmup_steps=2),
        algo=dict(name="dapo", loss_type="dapo", gamma=0.0, agg="seq_mean_token_mean"),
    )
    spec = build.learner_spec(cfg, "/m")
    assert (spec.lr, spec.micro_batch_size, spec.warmup_steps, spec.loss_type, spec.agg) == (
        3e-4,
        5,
        2,
        "dapo",
        "seq_mean_token_mean",
    )
    sft = build.sft_learner_spec(cfg, "/m", dtype="float32", micro_batch_size=3)
    assert (sft.lr, sft.loss_type, sft.agg, sft.micro_batch_size, sft.kl_coef) == (
        cfg.sft.lr,
        "grpo",
        "token_mean",
        3,
        0.0,
    )


def test_specs_carry_model_trust_remote_code():
    cfg = _cfg(model=dict(trust_remote_code=True))
    assert build.rollout_spec(cfg, "/m").trust_remote_code is True
    assert build.learner_spec(cfg, "/m").trust_remote_code is True
    assert build.rollout_spec(_cfg(), "/m").trust_remote_code is False


def test_a_spec_field_the_builder_forgets_fails_loudly():
    @dataclasses.dataclass(frozen=True)
    class Spec:
        model_path: str
        lr: float = 1e-6  # a default the config should have decided
        gather_bytes: int = 1 << 20  # an internal knob

    assert build._spec(Spec, ("gather_bytes",), model_path="/m", lr=1e-4) == Spec("/m", 1e-4)
    with pytest.raises(TypeError, match=r"Spec fields \['lr'\] are not set from the config"):
        build._spec(Spec, ("gather_bytes",), model_path="/m")
