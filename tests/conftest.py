"""Shared test set-up: loopback-only Ray, offline Hugging Face, GPU tests skipped with a reason."""

import os

# Set before anything imports ray: without it Ray listens on every interface even when told
# _node_ip_address="127.0.0.1" (see ../shared/notes/stack.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    # RLSYS_GPU_TESTS_ON=cpu: run the gpu tier with the CPU as its device (checks the tests themselves).
    if torch.cuda.is_available() or os.environ.get("RLSYS_GPU_TESTS_ON") == "cpu":
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
