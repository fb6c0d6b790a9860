"""The resumable learner state: its on-disk format, and saving / loading one rank's share of it.

:func:`save_state` / :func:`load_state` (called through :meth:`Learner.save_state` /
:meth:`Learner.load_state`) write and read everything a rank needs to continue bit for bit: its
fp32 master weights (its ZeRO partition; the low-precision model weights are re-derived from them
exactly as DeepSpeed's own step does), the AdamW moments and step counts, the LR schedule position
and applied-step counter, the engine's step counters, and the torch / numpy / Python RNG states.
Format (no pickle anywhere, so a state from an untrusted source cannot execute code on load):
``rank{r}.safetensors`` (tensors) and ``rank{r}.json`` (scalars) per rank, then
``learner_state.json``, the manifest, written by rank 0 last; a directory without a manifest is
incomplete and is refused. DeepSpeed's own ``save_checkpoint`` is not used: its files are
``torch.save`` pickles that need ``torch.load(weights_only=False)``.

Both are collectives: the ranks agree (one small all-reduce) before each further collective, so one
rank's failure fails every rank at once with that rank's error instead of leaving the others waiting.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlsys.workers.learner.errors import PEER_FAILED, LearnerStateError

if TYPE_CHECKING:
    from rlsys.workers.learner.engine import Learner

log = logging.getLogger("rlsys.learner")

__all__ = [
    "LEARNER_STATE_FORMAT",
    "LEARNER_STATE_MANIFEST",
    "LEARNER_STATE_VERSION",
    "load_state",
    "read_learner_state_manifest",
    "save_state",
]

LEARNER_STATE_MANIFEST = "learner_state.json"
LEARNER_STATE_FORMAT = "rlsys-learner-state"
LEARNER_STATE_VERSION = 1
# What must match between the run that saved a state and the one loading it: ZeRO partitions
# (hence the per-rank files) depend on all three.
_LAYOUT_KEYS = ("world_size", "zero_stage", "dtype")
# Loss-scaler fields DeepSpeed updates during training (static for bf16/fp32, kept for completeness).
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
# Engine counters (they do not change the numbers, but a resumed engine should report the same).
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def _rank_files(rank: int) -> tuple[str, str]:
    return f"rank{rank}.safetensors", f"rank{rank}.json"


def read_learner_state_manifest(path: str) -> dict[str, Any]:
    """The manifest of a COMPLETE learner state directory; raises :class:`LearnerStateError` otherwise.

    Complete means: ``learner_state.json`` exists and parses, has this format and version, and
    every file it lists exists with the size it records (a truncated or missing rank file is caught
    here). Reads JSON only; cheap enough for the driver to call before starting any learner.
    """
    root = Path(path)
    mpath = root / LEARNER_STATE_MANIFEST
    if not mpath.is_file():
        what = "does not exist" if not root.exists() else f"has no {LEARNER_STATE_MANIFEST}"
        raise LearnerStateError(
            f"learner state {str(root)!r} {what}: it is not a complete learner state (the manifest is written "
            "last, so a directory without it was never finished, e.g. a run killed while saving)"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise LearnerStateError(f"learner state manifest {str(mpath)!r} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != LEARNER_STATE_FORMAT:
        raise LearnerStateError(f"{str(mpath)!r} is not an rlsys learner state manifest")
    if manifest.get("version") != LEARNER_STATE_VERSION:
        raise LearnerStateError(
            f"learner state {str(root)!r} has format version {manifest.get('version')!r}; this "
            f"rlsys reads version {LEARNER_STATE_VERSION}"
        )
    for name, size in sorted(manifest.get("files", {}).items()):
        f = root / name
        if not f.is_file():
            raise LearnerStateError(f"learner state {str(root)!r}: {name} is listed in the manifest but missing")
        if f.stat().st_size != size:
            raise LearnerStateError(
                f"learner state {str(root)!r}: {name} has {f.stat().st_size} bytes, the "
                f"manifest records {size} (truncated or overwritten)"
            )
    return manifest


def _layout_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """None if the saved layout fits the current one, else a sentence saying what differs."""
    diffs = [
        f"{k} {saved.get(k)!r} (saved) vs {current[k]!r} (this learner)"
        for k in _LAYOUT_KEYS
        if saved.get(k) != current[k]
    ]
    if not diffs:
        return None
    return (
        "the learner state was saved with a different learner layout: " + "; ".join(diffs) + ". Resuming "
        "with a different number of learners, ZeRO stage or dtype is not supported (the optimizer state is "
        "partitioned per rank); resume with the settings of the run that saved it"
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _OptimizerLayout:
    """Where one rank's trainable state lives inside DeepSpeed's optimizer wrapper.

    ``masters``: the fp32 tensors the base ``torch.optim.AdamW`` updates (this rank's flat
    partition(s) under ZeRO, per-parameter copies for bf16 without ZeRO, the model parameters
    themselves for fp32 without ZeRO); ``base.state[master]`` holds their moments. ``sync()``
    rewrites the model's low-precision weights from the masters with the same copies (and, where
    the weights are replicated or persistent, the same all-gathers) that DeepSpeed's ``step`` runs
    after an update, so the model ends up exactly as it was when the state was saved. Relies on
    internals of DeepSpeed 0.19.8 (the pinned version); an unknown wrapper is refused by name.
    """

    def __init__(self, engine) -> None:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        opt = engine.optimizer
        self.opt = opt
        self.kind = type(opt).__name__
        self.scalers = [
            o for o in (getattr(opt, "loss_scaler", None), getattr(opt, "loss_scale_config", None)) if o is not None
        ]
        if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            if opt.offload_optimizer or opt.offload_param:
                raise LearnerStateError("learner state with ZeRO-3 offloading is not supported")
            self.masters = list(opt.fp32_partitioned_groups_flat)
            self.base = opt.optimizer
            self._sync = self._sync_stage3
        elif isinstance(opt, DeepSpeedZeroOptimizer):
            if opt.cpu_offload:
                raise LearnerStateError("learner state with ZeRO-1/2 CPU offloading is not supported")
            self.masters = list(opt.single_partition_of_fp32_groups)
            self.base = opt.optimizer
            self._sync = opt.update_lp_params
        elif isinstance(opt, BF16_Optimizer):
            self.masters = list(opt.fp32_groups_flat_partition)
            self.base = opt.optimizer
            self._sync = opt.update_lp_params
        elif isinstance(opt, FP16_UnfusedOptimizer):
            self.masters = [p for group in opt.fp32_groups for p in group]
            self.base = opt.optimizer
            self._sync = self._sync_unfused
        elif type(opt) is torch.optim.AdamW:
            self.masters = [p for group in opt.param_groups for p in group["params"]]
            self.base = opt
            self._sync = lambda: None  # the masters ARE the model's parameters
        else:
            raise LearnerStateError(f"learner state: DeepSpeed optimizer wrapper {self.kind} is not supported")

    def _sync_stage3(self) -> None:
        opt = self.opt
        opt._partition_all_parameters()  # release gathered (persistent) parameters, as step() does first
        for sub_group in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group)  # fp32 partition -> model partition
        if opt.persistent_parameters:  # small parameters stay gathered on every rank (collective)
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
        opt.invalidate_secondary_tensor()

    def _sync_unfused(self) -> None:
        for fp32_group, lp_group in zip(self.opt.fp32_groups, self.opt.fp16_groups):
            for fp32_param, lp_param in zip(fp32_group, lp_group):
                lp_param.data.copy_(fp32_param.data)

    @torch.no_grad()
    def sync(self) -> None:
        self._sync()


def _layout(learner: Learner) -> dict[str, Any]:
    return {"world_size": learner.world_size, "zero_stage": learner.spec.zero_stage, "dtype": learner.spec.dtype}


def _agree(learner: Learner, phase: str, error: BaseException | None) -> None:
    """Collective: raise on EVERY rank if any rank failed (its own error where it has one).

    Called before a phase's next collective, so one rank's failure (a full disk, a missing
    file) fails all ranks at once instead of leaving the others waiting in a gather.
    """
    flags = [0.0] * learner.world_size
    if error is not None:
        flags[learner.rank] = 1.0
    failed = [r for r, v in enumerate(learner.all_reduce(flags)) if v > 0]
    if error is not None:
        raise error
    if failed:
        raise LearnerStateError(
            f"learner rank {learner.rank}, {phase}: learner rank(s) {failed} failed (see their error); {PEER_FAILED}"
        )


def _collect_state(learner: Learner) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's state as (tensors for safetensors, JSON-able scalars)."""
    layout = _OptimizerLayout(learner.engine)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def put(name: str, t: torch.Tensor) -> None:
        t = t.detach()
        t = (t.to("cpu") if t.device.type != "cpu" else t).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or ptr == 0:
            t = t.clone()  # safetensors refuses tensors that share memory
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t

    masters, states = [], []
    for k, master in enumerate(layout.masters):
        put(f"master.{k}", master)
        masters.append({"shape": list(master.shape), "dtype": str(master.dtype).removeprefix("torch.")})
        entry: dict[str, Any] = {"tensors": [], "scalars": {}}
        for key, value in layout.base.state.get(master, {}).items():
            if torch.is_tensor(value):
                put(f"state.{k}.{key}", value)
                entry["tensors"].append(key)
            elif value is None or isinstance(value, (bool, int, float)):
                entry["scalars"][key] = value
            else:
                raise LearnerStateError(
                    f"learner rank {learner.rank}, save_state: optimizer state entry {key!r} "
                    f"is a {type(value).__name__}; only tensors and numbers are saved"
                )
        states.append(entry)
    put("rng.torch", torch.get_rng_state())
    if learner.device.type == "cuda":
        put("rng.cuda", torch.cuda.get_rng_state(learner.device))

    scalers = []
    for obj in layout.scalers:
        fields = {f: getattr(obj, f) for f in _SCALER_FIELDS if hasattr(obj, f)}
        bad = {f: type(v).__name__ for f, v in fields.items() if not (v is None or isinstance(v, (bool, int, float)))}
        if bad:
            raise LearnerStateError(
                f"learner rank {learner.rank}, save_state: loss-scaler fields {bad} are not numbers"
            )
        scalers.append(fields)
    sched = learner.engine.lr_scheduler
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    meta = {
        "format": LEARNER_STATE_FORMAT,
        "version": LEARNER_STATE_VERSION,
        "rank": learner.rank,
        **_layout(learner),
        "optimizer": layout.kind,
        "applied_steps": learner.applied_steps,
        "masters": masters,
        "optimizer_state": states,
        "lr_scheduler": {"last_epoch": sched.last_epoch, "step_count": sched._step_count},
        "engine": {c: getattr(learner.engine, c) for c in _ENGINE_COUNTERS if hasattr(learner.engine, c)},
        "loss_scalers": scalers,
        "rng": {
            "python": [py_version, list(py_internal), py_gauss],
            "numpy": [np_name, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        },
    }
    return tensors, meta


def save_state(learner: Learner, path: str) -> None:
    """Write this rank's training state into the directory ``path``; rank 0 writes the manifest last.

    Collective: every rank calls it, between train steps. ``path`` is created if missing and must
    not already hold a manifest (build the state in a fresh directory and rename it into place;
    the driver does that for the whole checkpoint). It must be on a file system every rank sees:
    rank 0 records the size of every rank's files in the manifest.

    Written: ``rank{r}.safetensors`` (fp32 master weights of this rank's ZeRO partition, AdamW
    ``exp_avg`` / ``exp_avg_sq`` / ``step``, torch CPU and CUDA RNG states) and ``rank{r}.json``
    (LR-schedule position, applied-step and engine counters, loss-scaler fields, numpy and Python
    RNG states, master shapes for validation), then ``learner_state.json`` (format, version,
    world_size, zero_stage, dtype, applied steps, each file with its size), written to a temp
    name and renamed. Every rank returns once the manifest exists; if any rank fails, every rank
    raises and no manifest is written, so the directory never reads as complete.
    """
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    root = Path(path)
    error: BaseException | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        if (root / LEARNER_STATE_MANIFEST).exists():
            raise LearnerStateError(
                f"learner rank {learner.rank}, save_state: {str(root)!r} already holds a "
                "learner state; write into a fresh directory (and rename it into place)"
            )
        tensors, meta = _collect_state(learner)
        tname, jname = _rank_files(learner.rank)
        save_file(tensors, str(root / tname), metadata={"format": LEARNER_STATE_FORMAT})
        (root / jname).write_text(json.dumps(meta, indent=1, sort_keys=True))
        for name in (tname, jname):
            os.chmod(root / name, 0o644)  # safetensors writes 0600; the state may be read by other users
            _fsync(root / name)  # on disk before the manifest says it is there
    except Exception as e:  # noqa: BLE001 - any failure must reach _agree, or the other ranks wait forever
        error = e
    _agree(learner, "save_state", error)  # every rank's files exist (also the barrier before the manifest)
    if learner.rank == 0:
        try:
            _write_manifest(learner, root)
        except Exception as e:  # noqa: BLE001 - as above
            error = e
    _agree(learner, "save_state", error)  # nobody returns before the manifest is written
    log.info("learner rank %d: saved training state to %s in %.2f s", learner.rank, root, time.perf_counter() - t0)


def _write_manifest(learner: Learner, root: Path) -> None:
    import deepspeed

    files = {}
    for rank in range(learner.world_size):
        for name in _rank_files(rank):
            f = root / name
            if not f.is_file():
                raise LearnerStateError(
                    f"learner rank 0, save_state: learner rank {rank}'s file {str(f)!r} is not visible here; the "
                    "state directory must be on a file system shared by every learner"
                )
            files[name] = f.stat().st_size
    manifest = {
        "format": LEARNER_STATE_FORMAT,
        "version": LEARNER_STATE_VERSION,
        **_layout(learner),
        "optimizer": _OptimizerLayout(learner.engine).kind,
        "applied_steps": learner.applied_steps,
        "model_path": learner.spec.model_path,
        "device": learner.device.type,
        "deepspeed_version": deepspeed.__version__,
        "torch_version": torch.__version__,
        "created_unix": time.time(),
        "files": files,
    }
    tmp = root / f".{LEARNER_STATE_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.chmod(tmp, 0o644)
    _fsync(tmp)
    os.replace(tmp, root / LEARNER_STATE_MANIFEST)
    _fsync(root)  # the rename itself is durable


def _read_rank_state(learner: Learner, root: Path, layout: _OptimizerLayout) -> tuple[dict[str, torch.Tensor], dict]:
    """Validate and read this rank's files (no pickle: safetensors + JSON); nothing is changed yet."""
    from safetensors.torch import load_file

    where = f"learner rank {learner.rank}, load_state from {str(root)!r}"
    manifest = read_learner_state_manifest(str(root))
    mismatch = _layout_mismatch(manifest, _layout(learner))
    if mismatch:
        raise LearnerStateError(f"{where}: {mismatch}")
    tname, jname = _rank_files(learner.rank)
    if tname not in manifest["files"] or jname not in manifest["files"]:
        raise LearnerStateError(f"{where}: the manifest lists no files for this rank")
    meta = json.loads((root / jname).read_text())
    tensors = load_file(str(root / tname))
    if meta.get("rank") != learner.rank or _layout_mismatch(meta, _layout(learner)):
        raise LearnerStateError(f"{where}: {jname} describes rank {meta.get('rank')} of another layout")
    if meta.get("optimizer") != layout.kind:
        raise LearnerStateError(
            f"{where}: saved with DeepSpeed optimizer {meta.get('optimizer')}, this learner runs {layout.kind}"
        )
    if len(meta["masters"]) != len(layout.masters) or len(meta["optimizer_state"]) != len(layout.masters):
        raise LearnerStateError(
            f"{where}: {len(meta['masters'])} master tensors saved, this rank has "
            f"{len(layout.masters)}: a different model or DeepSpeed partitioning"
        )
    for k, (saved, master) in enumerate(zip(meta["masters"], layout.masters)):
        t = tensors.get(f"master.{k}")
        if (
            t is None
            or list(t.shape) != list(master.shape)
            or t.dtype != master.dtype
            or saved["shape"] != list(master.shape)
        ):
            got = None if t is None else (list(t.shape), str(t.dtype))
            raise LearnerStateError(
                f"{where}: master tensor {k} is {got} in the file, this rank has "
                f"{(list(master.shape), str(master.dtype))}: a different model or DeepSpeed "
                "partitioning"
            )
        for key in meta["optimizer_state"][k]["tensors"]:
            if f"state.{k}.{key}" not in tensors:
                raise LearnerStateError(f"{where}: optimizer state tensor state.{k}.{key} is missing")
    if "rng.torch" not in tensors:
        raise LearnerStateError(f"{where}: the torch RNG state is missing")
    return tensors, meta


@torch.no_grad()
def load_state(learner: Learner, path: str) -> None:
    """Restore the training state written by :meth:`save_state`, so training continues bit for bit.

    Collective: every rank calls it (on a learner built with the same spec, typically a fresh
    one). First every rank validates without changing anything: the manifest exists (else the
    directory is incomplete), its files have the recorded sizes, world_size / zero_stage / dtype
    equal this learner's (else :class:`LearnerStateError` saying what differs: a different
    learner layout is not supported), and this rank's tensors have this rank's shapes. If any
    rank fails validation, every rank raises and the learner is untouched. Then: fp32 masters
    and AdamW state are copied in, the model weights re-derived from the masters (collective
    under ZeRO), and the LR schedule, counters and RNG states restored. Hyperparameters (lr,
    betas, ...) come from this learner's spec; the LR schedule continues at the saved position.
    The frozen reference model (``kl_coef > 0``) is the initial policy and is not part of the state.
    """
    t0 = time.perf_counter()
    root = Path(path)
    error: BaseException | None = None
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    layout: _OptimizerLayout | None = None
    try:
        layout = _OptimizerLayout(learner.engine)
        tensors, meta = _read_rank_state(learner, root, layout)
    except Exception as e:  # noqa: BLE001 - any failure must reach _agree, or the other ranks wait forever
        error = e
    _agree(learner, "load_state", error)
    assert layout is not None

    for k, master in enumerate(layout.masters):
        master.data.copy_(tensors[f"master.{k}"])
        saved = meta["optimizer_state"][k]
        if not saved["tensors"] and not saved["scalars"]:
            layout.base.state.pop(master, None)  # saved before this tensor's first update
            continue
        old = layout.base.state.get(master, {})
        new: dict[str, Any] = dict(saved["scalars"])
        for key in saved["tensors"]:
            t = tensors[f"state.{k}.{key}"]
            cur = old.get(key)
            if torch.is_tensor(cur) and cur.shape == t.shape and cur.dtype == t.dtype:
                cur.copy_(t)  # in place: DeepSpeed may hold views of the moments (hp-param links)
                new[key] = cur
            else:
                # AdamW (neither fused nor capturable, as built here) keeps its step count on the CPU
                # and the moments next to the parameter.
                new[key] = t if t.dim() == 0 else t.to(master.device)
        layout.base.state[master] = new
    layout.sync()

    sched = learner.engine.lr_scheduler
    sched.last_epoch = int(meta["lr_scheduler"]["last_epoch"])
    sched._step_count = int(meta["lr_scheduler"]["step_count"])
    # What LambdaLR.step computes for this position, from this spec's peak LR.
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    for name, value in meta["engine"].items():
        setattr(learner.engine, name, value)
    for obj, fields in zip(layout.scalers, meta["loss_scalers"]):
        for name, value in fields.items():
            setattr(obj, name, value)
    learner.applied_steps = int(meta["applied_steps"])

    torch.set_rng_state(tensors["rng.torch"])
    if learner.device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], learner.device)
    py_version, py_internal, py_gauss = meta["rng"]["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = meta["rng"]["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    log.info(
        "learner rank %d: loaded training state from %s (%d applied steps) in %.2f s",
        learner.rank,
        root,
        learner.applied_steps,
        time.perf_counter() - t0,
    )
