"""swallowctl: PPO-tune Llama-3.1-Swallow-8B on one GPU (4-bit QLoRA), run it on PyTorch or MLX.

The package stays light to import: heavy libraries (torch, transformers, mlx) are imported inside
the functions that need them, so `swallowctl --help` and `doctor` start fast.
"""

__version__ = "0.1.0"
