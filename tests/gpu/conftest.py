"""The GPU suite (scripts/gpu_check.sh): every test here needs CUDA and is not even collected without it."""

import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]
