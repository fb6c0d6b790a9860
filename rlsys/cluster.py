"""Connecting to Ray: a local loopback-only cluster, or joining a running one.

Local mode must not listen on any non-loopback interface. Ray 2.60 binds every interface unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is in the environment before ``ray.init`` (passing
``_node_ip_address="127.0.0.1"`` alone is not enough; see ../shared/notes/stack.md).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator, Optional

log = logging.getLogger("rlsys.cluster")

# Environment every rlsys process (driver and actors) runs with. vLLM runs in the actor's own
# process (no engine subprocess) and talks to itself over loopback only.
ACTOR_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "GLOO_SOCKET_IFNAME": "lo",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def loopback_env() -> None:
    """Set the variables that keep a local Ray cluster on loopback (call before importing ray)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def connect(address: Optional[str], num_cpus: Optional[int] = None, namespace: str = "rlsys") -> bool:
    """Start or join Ray. Returns True when this call started a local cluster (caller shuts it down).

    ``address`` None: a local cluster on 127.0.0.1 with ``num_cpus`` logical CPUs (default: the
    machine's count). Anything else (``"auto"``, ``"ray://..."``, ``"host:port"``) joins that
    cluster; under ``ray job submit`` RAY_ADDRESS is set and ``"auto"`` finds it.
    """
    loopback_env()
    import ray

    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS"):
        # Launched by `ray job submit`: the job belongs to that cluster, whatever the config says.
        address = "auto"
    if address is None:
        cpus = num_cpus or os.cpu_count() or 1
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            namespace=namespace,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )
        log.info("started a local loopback-only Ray cluster with %d CPUs", cpus)
        return True
    ray.init(address=address, namespace=namespace, log_to_driver=True,
             configure_logging=False)
    log.info("joined the Ray cluster at %s (%s CPUs)", address, ray.cluster_resources().get("CPU"))
    return False


@contextmanager
def session(address: Optional[str], num_cpus: Optional[int] = None, namespace: str = "rlsys") -> Iterator[int]:
    """``with session(...) as cpus:`` start or join Ray (see ``connect``); yields the cluster's CPU
    count and shuts down on exit only a cluster this call started."""
    started = connect(address, num_cpus, namespace)
    try:
        yield available_cpus()
    finally:
        if started:
            import ray

            ray.shutdown()


def actor_options(num_cpus: float, num_gpus: float = 0.0, name: Optional[str] = None) -> dict:
    """Ray ``.options(...)`` for an rlsys actor: resources plus the process environment.

    The environment goes in the actor's own runtime_env (merged with a submitted job's
    working_dir) rather than ray.init's, which a job submitted with its own runtime_env overrides.
    """
    opts: dict = {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": dict(ACTOR_ENV)}}
    if name is not None:
        opts["name"] = name
    return opts


def available_cpus() -> int:
    """Logical CPUs of the connected cluster."""
    import ray

    return int(ray.cluster_resources().get("CPU", 0))
