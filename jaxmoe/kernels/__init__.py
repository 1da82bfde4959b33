"""``@triton.jit`` code only: no JAX here.

Each module imports nothing but ``triton`` and ``triton.language``: the CPU path
re-executes a kernel's module with Triton's interpreter switched on (see ``_launch``).
"""
