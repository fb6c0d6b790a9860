"""Ray actors and their pure helpers: rollout (vLLM), learner (DeepSpeed), weight sync, batching."""
