"""The "triton" backend: Triton kernels and their host launchers, one op family per pair of files.

``<family>_jit.py`` holds the @triton.jit kernels of a family (lora, dora, mora, cross_entropy),
``<family>.py`` their launchers with the backend API that fusedpeft.backends looks up;
``dequant.py`` is the 4-bit dequantization kernel with its launcher, and ``_common.py`` the launch
rules every family shares (accepted devices and dtypes, config class per GPU, dot precision,
accumulation dtype, SM count, interpreter special cases)."""
