"""Priors: each offers `denoise(x, sigma) ~ E[x0 | x0 + sigma n = x]` on batches of shape (B, *state_shape)."""
