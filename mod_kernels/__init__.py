"""Fused Triton kernels for MoD blocks (placeholder until the kernels land)."""


def check_device_supported(device) -> None:
    raise RuntimeError("backend 'triton': the fused kernels are not built yet; use backend='reference'")
