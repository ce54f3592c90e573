"""Qwen3-VL masked diffusion (MDLM) trainer.

Importing this package imports neither deepspeed nor torch.distributed; only the training loop,
checkpointing and the distributed helpers do.
"""
