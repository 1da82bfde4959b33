"""How a planned kernel launch runs: on a GPU through jax-triton, on a CPU through Triton's
interpreter, or compiled ahead of time for a named target. See :mod:`.launch`."""

from jaxmoe.backends.launch import KernelLaunch, launch, poisoned_outputs

__all__ = ["KernelLaunch", "launch", "poisoned_outputs"]
