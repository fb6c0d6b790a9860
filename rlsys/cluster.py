"""Connecting to Ray: a local loopback-only cluster, or joining a running one.

Local mode must not listen on any non-loopback interface. Ray 2.60 binds every interface unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is in the environment before ``ray.init`` (passing
``_node_ip_address="127.0.0.1"`` alone is not enough; see ../shared/notes/stack.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rlsys import signals

log = logging.getLogger("rlsys.cluster")
_started_here = False  # connect() started the local cluster this process is attached to

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


def connect(address: str | None, num_cpus: int | None = None, namespace: str = "rlsys") -> bool:
    """Start or join Ray. Returns True when this call started a local cluster (caller shuts it down).

    ``address`` None: a local cluster on 127.0.0.1 with ``num_cpus`` logical CPUs (default: the
    machine's count). Anything else (``"auto"``, ``"ray://..."``, ``"host:port"``) joins that
    cluster; under ``ray job submit`` RAY_ADDRESS is set and ``"auto"`` finds it.
    """
    global _started_here
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
        signals.reinstall()  # ray.init put its own native SIGTERM handler (abort, exit 134) over ours
        log.info("started a local loopback-only Ray cluster with %d CPUs", cpus)
        _started_here = True
        return True
    _started_here = False
    ray.init(address=address, namespace=namespace, log_to_driver=True, configure_logging=False)
    signals.reinstall()
    log.info("joined the Ray cluster at %s (%s CPUs)", address, ray.cluster_resources().get("CPU"))
    return False


@contextmanager
def session(address: str | None, num_cpus: int | None = None, namespace: str = "rlsys") -> Iterator[int]:
    """``with session(...) as cpus:`` start or join Ray (see ``connect``); yields the cluster's CPU
    count and shuts down on exit only a cluster this call started, also when a signal stops the job
    (rlsys.signals; a joined cluster keeps running: only this job's actors were killed)."""
    started = connect(address, num_cpus, namespace)
    try:
        yield available_cpus()
    finally:
        if started:
            import ray

            global _started_here
            t0 = time.perf_counter()
            ray.shutdown()
            _started_here = False
            if signals.stopping():
                log.info("stopped the local Ray cluster in %.1f s", time.perf_counter() - t0)


def actor_options(
    num_cpus: float, num_gpus: float = 0.0, name: str | None = None, num_threads: int | None = None
) -> dict:
    """Ray ``.options(...)`` for an rlsys actor: resources plus the process environment.

    The environment goes in the actor's own runtime_env (merged with a submitted job's
    working_dir) rather than ray.init's, which a job submitted with its own runtime_env overrides.
    ``num_threads``: the actor's compute threads (OMP/MKL thread pools, which torch and vLLM's CPU
    kernels size from the environment at import); None: Ray's default (``num_cpus``).
    """
    env = dict(ACTOR_ENV)
    if num_threads is not None:
        env.update(OMP_NUM_THREADS=str(num_threads), MKL_NUM_THREADS=str(num_threads))
    opts: dict = {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": env}}
    if name is not None:
        opts["name"] = name
    return opts


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity; the machine's count where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_threads(configured: int | None, num_workers: int, num_cpus_per_worker: float, share: float = 1.0) -> int:
    """Compute threads for each of a role's ``num_workers`` actors.

    ``configured`` (``rollout.num_threads`` / ``learner.num_threads``) wins. Else, on a local cluster
    (:func:`connect` started it in this process), ``share`` of this machine's cores split evenly among
    the role's workers: the synchronous loop runs generate, train and sync one after another, so
    each phase may use every core (``share`` 1), and Ray's default (threads = the actor's ``num_cpus``,
    1 here) would leave the other cores idle; when generation overlaps training the two roles split
    the cores (``share`` 1/2 each, so neither oversubscribes the other). On a remote cluster,
    ``num_cpus_per_worker``.
    """
    if configured is not None:
        return int(configured)
    import ray

    if _started_here and ray.is_initialized():
        return max(1, int(machine_cores() * share) // max(1, num_workers))
    return max(1, int(num_cpus_per_worker))


def available_cpus() -> int:
    """Logical CPUs of the connected cluster."""
    import ray

    return int(ray.cluster_resources().get("CPU", 0))
