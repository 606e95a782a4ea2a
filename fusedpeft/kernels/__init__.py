"""Triton kernels (@triton.jit) and their host launchers: the "triton" backend. None yet."""
