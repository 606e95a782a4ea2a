"""Host-side pieces shared by the backends: the PyTorch / ATen code that the torch, cpu/cuda
(cpp_backend) and triton (kernels) backends compose around their own kernels, so that each rule
is written once: the LoRA expand onto the base GEMM and its gradients (lora), the chunk loop of
linear cross-entropy (cross_entropy), the DoRA weight norm and magnitude gradient (dora).

Imports nothing from the backends: torch_backend, cpp_backend and kernels import from here."""
