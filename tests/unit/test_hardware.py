"""model.dtype=auto: the dtype chosen for each hardware case (the probe faked), and the real probe."""

import dataclasses
import logging
import os
import subprocess
import sys

import pytest

from rlsys import hardware
from rlsys.config import ConfigError, RLConfig, resolve, resolve_dtype
from rlsys.hardware import Probe, choose_dtype

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512 | {"amx_bf16", "amx_tile"}


def cpu(flags, cap="AVX512", isa=""):
    return Probe(
        device="cpu", cpu_flags=frozenset(flags), torch_cpu_capability=cap, onednn_max_isa=isa, machine="x86_64"
    )


@pytest.mark.parametrize(
    "probe, dtype, reason",
    [
        (
            Probe("cuda", (9, 0), "NVIDIA H200"),
            "bfloat16",
            "cuda NVIDIA H200 (compute capability 9.0 >= 8.0) -> bfloat16",
        ),
        (Probe("cuda", (8, 0)), "bfloat16", "cuda (compute capability 8.0 >= 8.0) -> bfloat16"),
        (
            Probe("cuda", (7, 5), "Tesla T4"),
            "float32",
            "cuda Tesla T4 (compute capability 7.5 < 8.0: no native bf16) -> float32",
        ),
        (
            Probe("cuda", None),
            "bfloat16",
            "cuda workers (capability not visible from this process; assuming >= 8.0) -> bfloat16",
        ),
        (cpu(AVX2, "AVX2"), "float32", "cpu: AVX2 without AVX512_BF16 or AMX-BF16 -> float32"),
        (cpu(AVX512, "AVX512"), "float32", "cpu: AVX-512 without AVX512_BF16 or AMX-BF16 -> float32"),
        (cpu(AVX512_BF16), "bfloat16", "cpu: AVX512_BF16 -> bfloat16"),
        (cpu(AMX), "bfloat16", "cpu: AMX_BF16 -> bfloat16"),
        (cpu(AMX | {"avx512_bf16"}, isa="AVX512_CORE_AMX"), "bfloat16", "cpu: AVX512_BF16/AMX_BF16 -> bfloat16"),
        # An AVX2-only CPU emulated on a newer one: the flags are there, the ISA is capped.
        (
            cpu(AVX512_BF16, cap="AVX2"),
            "float32",
            "cpu: has AVX512_BF16 but PyTorch is capped at AVX2 (ATEN_CPU_CAPABILITY) -> float32",
        ),
        (
            cpu(AVX512_BF16, isa="AVX2"),
            "float32",
            "cpu: has AVX512_BF16 but oneDNN is capped at AVX2 (ONEDNN_MAX_CPU_ISA) -> float32",
        ),
        (
            cpu(AVX512_BF16, isa="AVX512_CORE"),
            "float32",
            "cpu: has AVX512_BF16 but oneDNN is capped at AVX512_CORE (ONEDNN_MAX_CPU_ISA) -> float32",
        ),
        (Probe("cpu", machine="aarch64"), "float32", "cpu: aarch64 without AVX512_BF16 or AMX-BF16 -> float32"),
    ],
)
def test_auto_per_hardware(probe, dtype, reason):
    choice = choose_dtype("auto", probe)
    assert (choice.dtype, choice.reason) == (dtype, reason)
    assert choice.native_bf16 == (dtype == "bfloat16")


def test_explicit_dtype_is_kept_and_slow_bf16_warns_once(caplog):
    slow = cpu(AVX2, "AVX2")
    assert choose_dtype("float32", cpu(AMX)).dtype == "float32"
    choice = choose_dtype("bfloat16", slow)
    assert choice.dtype == "bfloat16" and not choice.native_bf16
    hardware._warned.clear()
    with caplog.at_level(logging.WARNING, logger="rlsys.hardware"):
        assert hardware.warn_slow_bf16(choice)
        assert not hardware.warn_slow_bf16(choice)  # once
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "AVX2 without AVX512_BF16" in msg and "30-40x slower" in msg and "model.dtype=auto" in msg
    assert not hardware.warn_slow_bf16(choose_dtype("bfloat16", cpu(AMX)))  # native: no warning
    with pytest.raises(ValueError, match="float16"):
        choose_dtype("float16", slow)


def _with(cfg, **model):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def test_resolve_dtype_fills_the_config_once(caplog):
    cfg = RLConfig()
    assert cfg.model.dtype == "auto"
    with caplog.at_level(logging.INFO, logger="rlsys.config"):
        out = resolve_dtype(cfg, cpu(AVX2, "AVX2"))
    assert out.model.dtype == "float32"
    assert out.model.dtype_reason == "cpu: AVX2 without AVX512_BF16 or AMX-BF16 -> float32"
    assert "model.dtype=auto: cpu: AVX2 without AVX512_BF16" in caplog.text
    # Idempotent: a resolved config is not re-decided on another probe (entry points call it again).
    assert resolve_dtype(out, cpu(AMX)) == out
    assert resolve_dtype(cfg, cpu(AMX)).model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype(_with(cfg, dtype="fp8"), cpu(AMX))


def test_resolve_dtype_asks_every_device_the_job_computes_on():
    seen = []

    def probe(device):
        seen.append(device)
        return Probe("cuda", (9, 0)) if device == "cuda" else cpu(AVX2, "AVX2")

    gpu_learners = dataclasses.replace(
        RLConfig(), learner=dataclasses.replace(RLConfig().learner, num_gpus_per_worker=1.0)
    )
    assert resolve_dtype(gpu_learners, probe).model.dtype == "float32"  # the CPU rollout engine decides
    assert sorted(seen) == ["cpu", "cuda"]
    all_gpu = dataclasses.replace(
        gpu_learners, rollout=dataclasses.replace(gpu_learners.rollout, num_gpus_per_worker=1.0)
    )
    out = resolve_dtype(all_gpu, probe)
    assert (out.model.dtype, out.model.dtype_reason) == ("bfloat16", "cuda (compute capability 9.0 >= 8.0) -> bfloat16")


def test_sft_cache_key_follows_the_resolved_dtype(tmp_path):
    from rlsys.sft import sft_cache_key, sft_settings

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    keys = {}
    for name, probe in (("avx2", cpu(AVX2, "AVX2")), ("amx", cpu(AMX))):
        cfg = resolve_dtype(RLConfig(), probe)
        keys[name] = (sft_settings(cfg, str(base))["dtype"], sft_cache_key(sft_settings(cfg, str(base))))
    assert keys["avx2"][0] == "float32" and keys["amx"][0] == "bfloat16"
    assert keys["avx2"][1] != keys["amx"][1]


def _resolve_in_subprocess(**caps: str) -> tuple[str, str]:
    """(dtype, reason) that a fresh process resolves ``model.dtype=auto`` to, with these ISA caps."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    code = (
        "from rlsys.config import RLConfig, resolve; m = resolve(RLConfig()).model; "
        "print(m.dtype, m.dtype_reason, sep='|')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **caps}, capture_output=True, text=True, timeout=120, check=True
    )
    dtype, reason = out.stdout.strip().splitlines()[-1].split("|")
    return dtype, reason


def test_real_probe_on_this_machine_and_with_the_isa_capped():
    native = bool(hardware._cpu_flags() & {"avx512_bf16", "amx_bf16"})
    dtype, reason = _resolve_in_subprocess()
    assert dtype == ("bfloat16" if native else "float32"), reason
    # Emulating an AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) gives float32 anywhere.
    dtype, reason = _resolve_in_subprocess(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert dtype == "float32" and reason.startswith("cpu: ") and reason.endswith("-> float32"), reason


def test_resolve_makes_paths_absolute_and_resolves_dtype(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = dataclasses.replace(RLConfig(), run=dataclasses.replace(RLConfig().run, output_dir="out/x"))
    out = resolve(cfg, cpu(AVX2, "AVX2"))
    assert out.run.output_dir == str(tmp_path / "out" / "x")
    assert out.model.dtype == "float32"
    assert resolve(out) == out
