"""rlsys.signals without Ray: exit codes, the stop line and resume command, the signal count over
two channels, the second-signal and watchdog kills, and the context manager on real signals sent
to this process (with the kill and the exit replaced by fakes)."""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time

import pytest

from rlsys import checkpoint as ckpt
from rlsys import signals
from rlsys.sampler import SamplerState


class Exited(BaseException):
    """What the fake os._exit raises (so a test sees the code and nothing exits)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def controller(st=None, grace_s=1e9, clock=time.monotonic):
    calls = {"kill": 0, "exit": []}

    def kill_tree():
        calls["kill"] += 1
        return 0

    def exit_now(code):
        calls["exit"].append(code)
        raise Exited(code)

    out = io.StringIO()
    ctl = signals.StopController(
        st or signals.Status(app="rlsys.train", command="python -m rlsys.train"),
        grace_s,
        kill_tree=kill_tree,
        exit_now=exit_now,
        stream=out,
        clock=clock,
    )
    return ctl, calls, out


@pytest.fixture()
def restore_signals():
    """Put this process's handlers, wakeup fd and rlsys.signals' globals back after the test."""
    handlers = {s: signal.getsignal(s) for s in signals.HANDLED}
    old_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(old_fd)
    yield
    ctl = signals._controller
    if ctl is not None:
        ctl.monitor_stop.set()
    signals._controller = None
    signal.set_wakeup_fd(old_fd)
    for s, h in handlers.items():
        signal.signal(s, h)
    signals.status.partial.clear()


def test_exit_codes_and_names():
    assert signals.exit_code(signal.SIGINT) == 130
    assert signals.exit_code(signal.SIGTERM) == 143
    assert signals.signal_name(signal.SIGTERM) == "SIGTERM"
    assert signals.signal_name(999) == "signal 999"


def test_interrupted_is_not_an_exception():
    e = signals.Interrupted(signal.SIGTERM)
    assert isinstance(e, KeyboardInterrupt) and not isinstance(e, Exception)
    assert e.signum == signal.SIGTERM


def test_rerun_command_replaces_output_dir_and_resume():
    argv = ["algo=grpo", "run.output_dir=rel/dir", "run.resume=never", "trainer.total_steps=5", "eval.k=[1,4]"]
    cmd = signals.rerun_command("rlsys.train", argv, "/abs/run dir")
    assert cmd == (
        "python -m rlsys.train algo=grpo trainer.total_steps=5 'eval.k=[1,4]' "
        "'run.output_dir=/abs/run dir' run.resume=auto"
    )
    assert signals.rerun_command("rlsys.sft", ["sft.steps=20"]) == "python -m rlsys.sft sft.steps=20"


def test_stop_line():
    st = signals.Status(
        app="rlsys.train",
        phase="train",
        step=7,
        total_steps=80,
        output_dir="/r",
        command="python -m rlsys.train run.output_dir=/r run.resume=auto",
    )
    assert signals.stop_line(signal.SIGINT, st, "/r/checkpoints/step_000005") == (
        "rlsys: interrupted by SIGINT during train at step 7/80; last complete checkpoint: "
        "/r/checkpoints/step_000005; resume with: python -m rlsys.train run.output_dir=/r run.resume=auto"
    )
    assert "last complete checkpoint: none;" in signals.stop_line(signal.SIGTERM, st, None)
    sft = signals.Status(app="rlsys.sft", phase="sft", command="python -m rlsys.sft")
    assert signals.stop_line(signal.SIGTERM, sft, None) == (
        "rlsys: interrupted by SIGTERM during sft; no partial result was kept; run it again with: python -m rlsys.sft"
    )


def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    st = signals.Status(output_dir=str(tmp_path))
    assert signals.last_checkpoint(st) is None
    state = ckpt.DriverState(
        step=3,
        sampler=SamplerState(epoch=0, cursor=0),
        weight_version=3,
        wandb_run_id=None,
        skipped_in_a_row=0,
        first_reward=0.0,
        eval_before={},
    )
    done = ckpt.commit(ckpt.begin(tmp_path, 3), state, keep=2)
    ckpt.begin(tmp_path, 4)  # being written when the signal came
    assert signals.last_checkpoint(st) == str(done)
    assert signals.last_checkpoint(signals.Status()) is None


def test_checkpoint_begin_tracks_and_commit_untracks(tmp_path, restore_signals):
    signals.status.partial.clear()
    tmp = ckpt.begin(tmp_path, 1)
    assert str(tmp) in signals.status.partial
    state = ckpt.DriverState(
        step=1,
        sampler=SamplerState(epoch=0, cursor=0),
        weight_version=1,
        wandb_run_id=None,
        skipped_in_a_row=0,
        first_reward=0.0,
        eval_before={},
    )
    ckpt.commit(tmp, state, keep=2)
    assert not signals.status.partial
    # An interrupted save: tracked, then removed by the stop.
    tmp2 = ckpt.begin(tmp_path, 2)
    (tmp2 / "learner_state").mkdir()
    (tmp2 / "learner_state" / "rank0.safetensors").write_bytes(b"x" * 10)
    signals.remove_partial(signals.status)
    assert not tmp2.exists() and not signals.status.partial
    # A leftover of a killed run (no stop handling) is swept by the next begin.
    stale = tmp_path / "checkpoints" / ".step_000009.tmp-deadbeef"
    stale.mkdir()
    tmp3 = ckpt.begin(tmp_path, 3)
    assert not stale.exists() and tmp3.exists()
    assert ckpt.sweep_partial(tmp_path) == [tmp3]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]


def test_first_signal_raises_once_and_announces_once():
    ctl, calls, out = controller()
    ctl.seen(signal.SIGINT, "fd")  # the wakeup fd usually sees it first ...
    with pytest.raises(signals.Interrupted) as e:
        ctl.on_handler(signal.SIGINT)  # ... then the handler: the same signal, counted once
    assert e.value.signum == signal.SIGINT
    assert ctl.count == 1 and calls["kill"] == 0
    assert out.getvalue() == "rlsys: stopping (SIGINT) during start-up; press Ctrl-C again to kill at once\n"
    assert ctl.deadline is not None


def test_handler_first_then_fd_is_one_signal():
    ctl, calls, out = controller()
    with pytest.raises(signals.Interrupted):
        ctl.on_handler(signal.SIGTERM)
    ctl.seen(signal.SIGTERM, "fd")
    assert ctl.count == 1 and calls["kill"] == 0
    assert "send SIGTERM again to kill at once" in out.getvalue()


def test_second_signal_kills_at_once_with_the_first_signals_code():
    st = signals.Status(
        app="rlsys.train",
        phase="sync",
        step=2,
        total_steps=3,
        output_dir="/nonexistent",
        command="python -m rlsys.train run.output_dir=/nonexistent run.resume=auto",
    )
    ctl, calls, out = controller(st)
    ctl.seen(signal.SIGTERM, "fd")
    with pytest.raises(Exited) as e:
        ctl.seen(signal.SIGINT, "fd")
    assert e.value.code == 143 and calls == {"kill": 1, "exit": [143]}
    lines = out.getvalue().splitlines()
    assert lines[1] == "rlsys: second signal (SIGINT): killing the job's processes now"
    assert lines[2].startswith("rlsys: interrupted by SIGTERM during sync at step 2/3; last complete checkpoint: none")
    ctl.finish_line()  # the main thread getting there too prints nothing more
    assert len(out.getvalue().splitlines()) == 3


def test_second_signal_seen_by_the_handler_also_kills():
    ctl, calls, _ = controller()
    with pytest.raises(signals.Interrupted):
        ctl.on_handler(signal.SIGINT)
    with pytest.raises(Exited):
        ctl.on_handler(signal.SIGINT)  # wakeup fd not working: the handler's count decides
    assert calls["exit"] == [130]


def test_watchdog_kills_when_the_grace_runs_out():
    now = [100.0]
    ctl, calls, out = controller(grace_s=8.0, clock=lambda: now[0])
    rsock, wsock = socket.socketpair()
    try:
        wsock.send(bytes([signal.SIGTERM]))
        result = {}

        def run():
            try:
                ctl.run_monitor(rsock, poll_s=0.01)
            except Exited as e:
                result["code"] = e.code

        th = threading.Thread(target=run, daemon=True)
        th.start()
        for _ in range(200):
            if ctl.count == 1:
                break
            time.sleep(0.01)
        assert ctl.count == 1 and calls["kill"] == 0  # counted from the fd; not expired yet
        now[0] += 8.5
        th.join(5)
        assert result == {"code": 143} and calls["kill"] == 1
        assert "still running 8 s after SIGTERM: killing the job's processes now" in out.getvalue()
    finally:
        ctl.monitor_stop.set()
        rsock.close()
        wsock.close()


def test_context_on_a_real_sigint(restore_signals, tmp_path):
    partial = tmp_path / "checkpoints" / ".step_000002.tmp-0000"
    ctl, calls, out = controller(signals.status)
    with pytest.raises(SystemExit) as e, signals.stop_on_signals("rlsys.train", ["a=1"], controller=ctl) as st:
        st.output_dir = str(tmp_path)
        st.command = signals.rerun_command("rlsys.train", ["a=1"], str(tmp_path))
        signals.set_phase("train", step=2, total_steps=3)
        partial.mkdir(parents=True)
        signals.track_partial(partial)
        assert not signals.stopping()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # interrupted at once
        pytest.fail("the signal did not interrupt the work")
    assert e.value.code == 130 and calls == {"kill": 0, "exit": []}
    assert signals.stopping()
    assert not partial.exists()
    lines = out.getvalue().splitlines()
    assert lines == [
        "rlsys: stopping (SIGINT) during train; press Ctrl-C again to kill at once",
        f"rlsys: interrupted by SIGINT during train at step 2/3; last complete checkpoint: none; resume with: "
        f"python -m rlsys.train a=1 run.output_dir={tmp_path} run.resume=auto",
    ]


def test_context_error_while_unwinding_is_still_a_stop(restore_signals):
    ctl, calls, out = controller(signals.status)
    with pytest.raises(SystemExit) as e, signals.stop_on_signals("rlsys.eval", [], controller=ctl):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            raise RuntimeError("an actor was already gone")  # clean-up failing after the signal
    assert e.value.code == 143
    assert "rlsys: interrupted by SIGTERM during start-up; no partial result was kept" in out.getvalue()


def test_context_without_a_signal_changes_nothing(restore_signals):
    before = {s: signal.getsignal(s) for s in signals.HANDLED}
    ctl, calls, out = controller(signals.status)
    with signals.stop_on_signals("rlsys.train", [], controller=ctl) as st:
        assert signal.getsignal(signal.SIGINT) == ctl.on_handler
        signals.set_phase("train", step=1)
    assert st.phase == "train"  # a normal end: no line, no exit
    with pytest.raises(ValueError), signals.stop_on_signals("rlsys.train", [], controller=ctl):
        raise ValueError("a bug")
    with (
        pytest.raises(SystemExit) as e,
        signals.stop_on_signals("rlsys.train", [], controller=controller(signals.status)[0]),
    ):
        raise SystemExit(2)  # a config error: its own code
    assert e.value.code == 2
    assert {s: signal.getsignal(s) for s in signals.HANDLED} == before
    assert not signals.stopping() and out.getvalue() == ""


def test_keyboard_interrupt_without_a_signal_is_a_sigint_stop(restore_signals):
    ctl, calls, out = controller(signals.status)
    with pytest.raises(SystemExit) as e, signals.stop_on_signals("rlsys.sft", ["sft.steps=3"], controller=ctl):
        raise KeyboardInterrupt  # e.g. what ray.get raises for a Ctrl-C
    assert e.value.code == 130
    assert out.getvalue().splitlines()[-1] == (
        "rlsys: interrupted by SIGINT during start-up; no partial result was "
        "kept; run it again with: python -m rlsys.sft sft.steps=3"
    )


def test_reinstall_puts_the_handlers_back(restore_signals):
    ctl, _, _ = controller(signals.status)
    with pytest.raises(SystemExit), signals.stop_on_signals("rlsys.train", [], controller=ctl):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init does, natively
        signals.reinstall()
        assert signal.getsignal(signal.SIGTERM) == ctl.on_handler
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)


def test_grace_defaults(monkeypatch):
    monkeypatch.delenv("RLSYS_STOP_GRACE_S", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert signals.default_grace_s() == signals.DEFAULT_GRACE_S == 8.0
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # under `ray job submit`
    assert signals.default_grace_s() == signals.JOB_GRACE_S < 3.0
    monkeypatch.setenv("RLSYS_STOP_GRACE_S", "1.5")
    assert signals.default_grace_s() == 1.5


def test_kill_descendants_kills_the_tree():
    import subprocess
    import sys

    import psutil

    # A child that starts a grandchild that starts a great-grandchild, all sleeping.
    inner = "import time; time.sleep(60)"
    middle = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {inner!r}]); time.sleep(60)"
    outer = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {middle!r}]); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", outer])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(psutil.Process(child.pid).children(recursive=True)) < 2:
            time.sleep(0.05)
        tree = psutil.Process(child.pid).children(recursive=True)
        assert len(tree) == 2
        t0 = time.monotonic()
        assert signals.kill_descendants(root=child.pid) == 2  # the child's tree, not the child
        assert time.monotonic() - t0 < 2.0  # a killed (zombie) process counts as gone at once
        for p in tree:
            assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(10)
