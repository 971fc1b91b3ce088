"""Reward environments: score a rollout's responses (math answer verification, ...)."""
