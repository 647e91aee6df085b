"""Triton kernels of vllm-emosteer; installed as `vllm_emosteer.kernels`."""
