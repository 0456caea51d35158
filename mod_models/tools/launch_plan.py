"""Every kernel launch the zoo models make, recorded instead of executed.

:func:`record_model_launches` runs each launcher a MoD block of every stage shape of resnet18_mod,
resnet50_mod and both MobileNets (224x224) uses, for fp32/bf16/fp16, NCHW and channels_last, every
fusion, both routers, forward, backward, in-place inference and the deployed block, with every
kernel's ``run`` replaced by a record of its arguments. :mod:`mod_models.tools.compile_check` compiles
those records for real GPUs; the test suite compares their :func:`specialisation` (the code path a
launch takes) with what the CPU interpreter suite launched (``tests/conftest.py``).
Works with compiled and with interpreted kernels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from mod_kernels import fused_block, fused_route_pack, fused_scale_fuse

KERNEL_MODULES = (fused_route_pack, fused_scale_fuse, fused_block)


@dataclass
class RecordedLaunch:
    kernel: object
    args: tuple
    kwargs: dict


def all_kernels() -> dict[str, object]:
    """Every ``*_kernel`` of the fused-op modules (``JITFunction``, or ``InterpretedFunction``
    under ``TRITON_INTERPRET=1``)."""
    kernels = {}
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "run") and hasattr(value, "arg_names"):
                kernels[name] = value
    return kernels


class LaunchRecorder:
    """Context manager replacing every kernel launch by a record of its arguments."""

    def __init__(self) -> None:
        self.launches: list[RecordedLaunch] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> "LaunchRecorder":
        for name, kernel in all_kernels().items():
            self._saved[name] = kernel.__dict__.get("run")

            def record(*args, grid, warmup, _kernel=kernel, **kwargs):
                self.launches.append(RecordedLaunch(_kernel, args, kwargs))

            kernel.run = record
        return self

    def __exit__(self, *exc) -> None:
        for name, kernel in all_kernels().items():
            saved = self._saved.pop(name, None)
            if saved is None:
                del kernel.run
            else:
                kernel.run = saved


def model_block_shapes(names: tuple[str, ...], resolution: int) -> list[tuple]:
    """Distinct ``(C, k, H, W, C_h, activation, kind, hidden, has_expand)`` of the MoD blocks of zoo
    models at ``resolution`` (``kind``, ``hidden``: the fused deploy kernel's view of ``f_k``)."""
    import mod_models

    shapes = set()

    def hook(block, args):
        _, channels, height, width = args[0].shape
        shapes.add((
            channels, block.k, height, width, block.router.fc1.out_features, block.activation,
            block.fused_kind, block.reduced_width, block.fused_has_expand,
        ))

    for name in names:
        model = mod_models.build_model(name, backend="reference").to("meta").eval()
        for module in model.modules():
            if isinstance(module, mod_models.MoDBlock):
                module.register_forward_pre_hook(hook)
        with torch.no_grad():
            model(torch.empty(1, 3, resolution, resolution, device="meta"))
    return sorted(shapes)


def exercise_block_kernels(shape: tuple, dtype: torch.dtype, channels_last: bool) -> None:
    """Call every launcher a MoD block of ``shape`` uses, for every fusion and both routers."""
    from mod_kernels.fused_route_pack import (
        launch_input_backward,
        launch_route_pack,
        launch_router_backward,
        launch_select_pack,
    )
    from mod_kernels.fused_scale_fuse import (
        launch_fuse_backward_input,
        launch_fuse_backward_slots,
        launch_fuse_copy,
        launch_fuse_inplace,
    )

    channels, k, height, width, hidden, activation, kind, reduced_width, has_expand = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.zeros(1, channels, height, width, dtype=dtype).contiguous(memory_format=fmt)
    y = torch.zeros(1, k, height, width, dtype=dtype).contiguous(memory_format=fmt)
    # A model converted to `dtype` holds its router in `dtype` too; under autocast an fp32 model's
    # blocks see `dtype` feature maps beside fp32 router weights.
    router_dtypes = [dtype] + ([torch.float32] if dtype != torch.float32 else [])
    fc1 = torch.zeros(hidden, channels, dtype=dtype)
    fc2 = torch.zeros(channels, hidden, dtype=dtype)
    w = torch.zeros(1, k)
    idx = torch.zeros(1, k, dtype=torch.int64)
    slot = torch.zeros(1, channels, dtype=torch.int32)
    pooled = torch.zeros(1, channels)
    for router_dtype in router_dtypes:
        launch_route_pack(x, fc1.to(router_dtype), fc2.to(router_dtype), k)
    launch_select_pack(x, pooled, k)
    launch_router_backward(w, slot, pooled, torch.zeros(1, hidden), pooled, fc1, fc2, height * width)
    shape = list(x.shape)
    relu = activation == "relu"
    for fusion in ("first_k", "last_k", "original"):
        launch_fuse_copy(x, y, w, idx, slot, fusion, relu)
        launch_fuse_inplace(x, y, w, idx, slot, fusion, relu)
        launch_fuse_backward_slots(x, x, y, w, idx, fusion, relu, dtype)  # MoD blocks (paired backward)
        launch_fuse_backward_slots(x, x, y, w, idx, fusion, relu)  # standalone scale_fuse
        if relu:
            launch_fuse_backward_input(x, x, slot, k, fusion)
        target = None if fusion == "original" else y
        launch_input_backward(x, target, y, slot, pooled, shape, dtype, channels_last, fusion)  # learned
        launch_input_backward(x, target, y, slot, None, shape, dtype, channels_last, fusion)  # random router
    launch_input_backward(None, None, y, slot, pooled, shape, dtype, channels_last, "first_k")  # route_pack alone
    # The deployed block (folded batch norms): every fusion, both routers, in place and not. It hands
    # the kernels its own parameters: the packed folded weights in the model's dtype (`dtype`, or fp32
    # for an fp32 model under autocast) and the router, which the deploy form keeps in fp32.
    for weight_dtype in router_dtypes:
        params = torch.zeros(fused_block.params_numel(kind, k, reduced_width, has_expand), dtype=weight_dtype)
        routers = [dict(fc1_weight=fc1.float(), fc2_weight=fc2.float(), scores=None),
                   dict(fc1_weight=None, fc2_weight=None, scores=pooled)]
        for fusion in ("first_k", "last_k", "original"):
            for inplace in (True, False):
                for router in routers:
                    fused_block.fused_block_unchecked(
                        x, kind, params, k, reduced_width, 1, fusion, relu, inplace=inplace, has_expand=has_expand,
                        **router,
                    )


def record_model_launches(
    models: tuple[str, ...] = ("resnet18_mod", "resnet50_mod", "mobilenet_v2_mod", "mobilenet_v2_mod_l"),
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16),
    resolution: int = 224,
) -> list[RecordedLaunch]:
    """Launches of every kernel at the MoD block shapes of ``models`` (the other ResNets share
    their stage shapes), for each dtype and memory format, recorded, not executed."""
    recorder = LaunchRecorder()
    with recorder:
        for shape in model_block_shapes(models, resolution):
            for dtype in dtypes:
                for channels_last in (False, True):
                    exercise_block_kernels(shape, dtype, channels_last)
    return recorder.launches


# Constexprs that size tiles rather than choose a code path: compile_check covers their values on
# real GPU targets; the interpreter suite covers every path (flags, dtypes, layout, chunking).
def _is_tile(name: str) -> bool:
    return name.startswith("BLOCK_") or name.endswith("_POW2") or name in ("E_BLOCK", "SNAPSHOT_P")


def specialisation(kernel, args: tuple, kwargs: dict) -> tuple:
    """The code path of one launch: ``(kernel, flags, dtypes, layout, multi_chunk)``.

    ``flags``: its non-tile constexprs (``HW_FLAT``, ``RELU``, ``IN_PLACE``, ...); ``dtypes``: of its
    tensor arguments in order; ``layout``: ``"channels_last"`` or ``"nchw"`` of its first 4-D
    tensor; ``multi_chunk``: a pooling launch spanning more than one chunk of H x W.
    """
    names = list(kernel.arg_names)
    bound = dict(zip(names, args))
    bound.update(kwargs)
    parameters = inspect.signature(kernel.fn).parameters
    flags = tuple(sorted(
        (name, bool(value) if isinstance(value, bool) else value)
        for name, value in bound.items()
        if name in parameters and "constexpr" in str(parameters[name].annotation) and not _is_tile(name)
    ))
    tensors = [value for name, value in bound.items() if isinstance(value, torch.Tensor)]
    dtypes = tuple(str(t.dtype).replace("torch.", "") for t in tensors)
    maps = [t for t in tensors if t.dim() == 4]
    layout = ("channels_last" if maps and maps[0].is_contiguous(memory_format=torch.channels_last)
              and not maps[0].is_contiguous() else "nchw")
    multi_chunk = "HW_CHUNK" in bound and int(bound["HW_CHUNK"]) < int(bound["HW"])
    return (kernel.fn.__name__, flags, dtypes, layout, multi_chunk)
