"""Where kernels would run: the platform and the config arch of a device.

The platform is that of the device jax places new computations on: ``jax.default_device``
when set (a device or a platform name), else the default backend's first device, never a
fixed ``jax.devices()[0]``. Under ``shard_map`` on a mesh of GPUs that is a GPU. The arch
used for launch planning (tile tables, shared memory, XCD count) is that of the platform's
devices; mixed GPU models of one platform in one process are not told apart (jax-triton
compiles for one device).
"""

from __future__ import annotations

import functools
import re

import jax

__all__ = ["triton_available", "platform_of", "default_platform", "arch_for", "device_name", "fp8_dtype",
           "GPU_PLATFORMS"]

GPU_PLATFORMS = ("cuda", "rocm")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package imports here (Linux wheels only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def platform_of(device: jax.Device) -> str:
    """``"cuda"``, ``"rocm"`` or ``"cpu"`` for one device (other platforms by their name)."""
    name = device.platform.lower()
    if name == "gpu":  # older jaxlibs name both GPU platforms "gpu"
        version = getattr(device.client, "platform_version", "").lower()
        return "rocm" if ("rocm" in version or "hip" in version) else "cuda"
    return name


def default_platform() -> str:
    """The platform of the device jax places new computations on (honours ``jax.default_device``)."""
    device = jax.config.jax_default_device
    if isinstance(device, str):  # a platform name
        return "cuda" if device == "gpu" else device
    if device is None:
        device = jax.devices()[0]
    return platform_of(device)


@functools.cache
def _devices_of(platform: str) -> tuple[jax.Device, ...]:
    for backend in (platform, "gpu"):
        try:
            devices = tuple(d for d in jax.devices(backend) if platform_of(d) == platform)
        except RuntimeError:
            continue
        if devices:
            return devices
    return ()


def arch_for(platform: str) -> str:
    """The config arch kernels are planned for on ``platform``: ``sm90`` on CUDA (and on a CPU,
    whose interpreter runs the sm90 plans), ``gfx942``/``gfx950`` on ROCm by device kind."""
    if platform != "rocm":
        return "sm90"
    devices = _devices_of("rocm")
    kind = devices[0].device_kind.lower() if devices else ""
    return "gfx950" if ("mi35" in kind or "gfx950" in kind) else "gfx942"


def device_name(platform: str) -> str | None:
    """The GPU model kernels run on for ``platform``, as config tables name it: the device
    kind with runs of other characters than letters, digits, ``.`` and ``-`` made one ``_``
    (``"NVIDIA H200"`` -> ``"NVIDIA_H200"``, as vLLM names its per-device tables); None
    where the platform has no GPU (a CPU, or ahead-of-time planning for another target)."""
    if platform not in GPU_PLATFORMS:
        return None
    devices = _devices_of(platform)
    return normalize_device_name(devices[0].device_kind) if devices else None


def normalize_device_name(kind: str) -> str | None:
    """``kind`` with every run of characters other than letters, digits, ``.`` and ``-``
    made one ``_`` (None when nothing is left)."""
    name = re.sub(r"[^A-Za-z0-9.-]+", "_", kind).strip("_")
    return name or None


def fp8_dtype(arch: str | None = None):
    """The fp8 e4m3 dtype the kernels multiply on ``arch`` (default: that of the default
    platform): ``float8_e4m3fnuz`` on gfx942 (MI300, no OCP fp8), ``float8_e4m3fn`` (OCP)
    on sm_90, gfx950 and on a CPU (whose interpreter runs the sm90 plans)."""
    import jax.numpy as jnp

    if arch is None:
        arch = arch_for(default_platform())
    return jnp.dtype(jnp.float8_e4m3fnuz if arch == "gfx942" else jnp.float8_e4m3fn)
