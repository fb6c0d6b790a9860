"""vLLM worker extension: the public hook through which new weights enter a running engine.

vLLM loads this class into its worker (``LLM(worker_extension_cls="rlsys.workers.vllm_ext.
WeightReloadExtension")``) and ``llm.collective_rpc("rlsys_reload_weights", ...)`` calls it.
On CPU, ``model.load_weights`` alone fails because vLLM prepacks linear weights and empties
``layer.weight``; ``model_runner.reload_weights(is_checkpoint_format=True)`` re-runs the loader's
processing layer by layer, so checkpoint-format tensors go in and kernel-format weights come out.

It also defines :class:`TorchDistTransferEngine`, rlsys' engine for vLLM's own weight-transfer protocol
(``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``)
over :mod:`rlsys.workers.torchdist`, registered as ``"rlsys_torchdist"`` when this module is imported.
vLLM imports the ``worker_extension_cls`` module in every worker process before it loads the model
(where it creates the engine), so in-process and multi-process engines alike know the backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from rlsys.workers.torchdist import GroupAddress, TensorMeta, init_group, receive_buckets
from rlsys.workers.vllm_logging import drop_benign_reload_warning

# Imported by vLLM in every process that holds model ranks (it loads the worker extension there).
drop_benign_reload_warning()

#: The backend name rlsys registers with vLLM's WeightTransferEngineFactory.
TORCHDIST_BACKEND = "rlsys_torchdist"


def _needs_tied_head_alias(model: torch.nn.Module, hf_config: Any) -> bool:
    """The learner sends a tied embedding once, as checkpoints store it. vLLM models that keep a
    separate lm_head module (Qwen2, Llama: tied by sharing the Parameter) reload each module's
    kernel-format weight on its own, so the head must receive the matrix under its own name too;
    models that compute logits from the embedding itself (Gemma 2 / 3) have no lm_head and refuse it."""
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    head = getattr(model, "lm_head", None)
    return tied and isinstance(getattr(head, "weight", None), torch.Tensor)


def _with_tied_head(pairs: Iterable[tuple[str, torch.Tensor]], alias: bool) -> Iterable[tuple[str, torch.Tensor]]:
    for name, tensor in pairs:
        yield name, tensor
        if alias and name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


@dataclass
class TorchDistInitInfo(WeightTransferInitInfo):
    """How one engine joins its transfer group (``rlsys.workers.torchdist``): TP rank r is group rank 1 + r."""

    host: str
    port: int
    world_size: int  # 1 (the learner) + the engine's TP ranks
    name: str
    backend: str  # "gloo" | "nccl"
    timeout_s: float


@dataclass
class TorchDistUpdateInfo(WeightTransferUpdateInfo):
    """One weight stream: its metadata (what the bytes are) and the version it becomes."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    version: int
    bucket_bytes: int
    piece_bytes: int

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise ValueError(
                f"update info lists {len(self.names)} names, {len(self.dtypes)} dtypes, {len(self.shapes)} shapes"
            )

    def meta(self) -> list[TensorMeta]:
        return [TensorMeta(n, d, tuple(s)) for n, d, s in zip(self.names, self.dtypes, self.shapes)]


class TorchDistTransferEngine(WeightTransferEngine[TorchDistInitInfo, TorchDistUpdateInfo]):
    """Receives checkpoint-format weights over a stateless gloo/NCCL group and loads them with vLLM's
    layerwise reload (start: initialise it; update: receive and ``load_weights`` bucket by bucket;
    finish: finalise it). Uses no ``torch.accelerator`` helper (they raise on a CPU-only torch).

    ``last`` is what the latest completed stream was: ``{"version", "digest", "nbytes"}`` (crc32 of the
    bytes, for the caller to compare with the sender's)."""

    init_info_cls = TorchDistInitInfo
    update_info_cls = TorchDistUpdateInfo

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: Any = None
        self.last: dict[str, Any] = {"version": -1, "digest": -1, "nbytes": 0}

    def init_transfer_engine(self, init_info: TorchDistInitInfo) -> None:
        self.shutdown()
        addr = GroupAddress(init_info.host, init_info.port, init_info.world_size, init_info.name)
        rank = 1 + self.parallel_config.rank
        device = self.device if init_info.backend == "nccl" else torch.device("cpu")
        self.buffer_device = device
        self.group = init_group(addr, rank, init_info.backend, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if self.group is None:
            raise RuntimeError("start_weight_update before init_weight_transfer_engine joined a transfer group")
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: TorchDistUpdateInfo) -> None:
        alias = _needs_tied_head_alias(self.model, self.model_config.hf_config)

        def load(pairs: list[tuple[str, torch.Tensor]]) -> None:
            self.model.load_weights(_with_tied_head(pairs, alias))

        t0 = time.perf_counter()
        got = receive_buckets(
            self.group, update_info.meta(), update_info.bucket_bytes, update_info.piece_bytes, self.buffer_device, load
        )
        # receive_s: the whole stream, of which load_s in vLLM's load_weights and wait_s in the broadcasts.
        self.last = {"version": int(update_info.version), **got, "receive_s": time.perf_counter() - t0}

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a CPU-only torch
        # outside vLLM's CPU worker; a CUDA stream sync is all the NCCL path needs.
        self.receive_weights(self.parse_update_info(update_info))
        if self.buffer_device.type == "cuda":
            torch.cuda.synchronize(self.buffer_device)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        t0 = time.perf_counter()
        finalize_layerwise_reload(self.model, self.model_config)
        self.last["finalize_s"] = time.perf_counter() - t0

    def shutdown(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            try:
                group.shutdown()
            except Exception:  # noqa: BLE001 - the sender may be gone already
                pass


def register_engines() -> None:
    """Register ``rlsys_torchdist`` with vLLM (idempotent: vLLM raises on a duplicate name)."""
    if TORCHDIST_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(TORCHDIST_BACKEND, TorchDistTransferEngine)


register_engines()


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
        alias = self._needs_tied_head_alias()

        def tracked() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                seen.append(name)
                yield name, tensor

        self.model_runner.reload_weights(weights_iterator=_with_tied_head(tracked(), alias), is_checkpoint_format=True)
        return seen

    def _needs_tied_head_alias(self) -> bool:
        return _needs_tied_head_alias(self.model_runner.get_model(), self.model_runner.model_config.hf_config)

    def rlsys_transfer_state(self) -> dict[str, Any]:
        """The transfer engine's latest completed stream, ``{"version", "digest", "nbytes"}``."""
        engine = getattr(self, "weight_transfer_engine", None)
        if not isinstance(engine, TorchDistTransferEngine):
            raise RuntimeError("this engine was not started with the rlsys_torchdist weight transfer backend")
        return dict(engine.last)

    def rlsys_describe(self) -> dict[str, int]:
        """This rank's compute threads and process id."""
        return {"threads": torch.get_num_threads(), "pid": os.getpid()}

    def rlsys_param_names(self) -> list[str]:
        """Names of the engine's parameters (vLLM naming, e.g. fused qkv_proj)."""
        return [name for name, _ in self.model_runner.get_model().named_parameters()]
