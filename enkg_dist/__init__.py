"""enkg-dist: Ensemble Kalman Diffusion Guidance (Zheng et al., arXiv:2409.20175) for black-box inverse problems."""

__version__ = "0.1.0"
