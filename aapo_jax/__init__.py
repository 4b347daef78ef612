"""aapo-jax: AAPO and its baselines for RL post-training of LLM reasoning in JAX/Flax NNX."""
