"""Inverse problems: a forward model G, the observation y, its noise covariance Gamma, and (for tests) the truth."""
