"""rlsys: distributed RLVR post-training with F-GRPO."""

__version__ = "0.1.0"
