"""Rollout engines: sampling completions with log-probs, and taking weights from the trainer."""
