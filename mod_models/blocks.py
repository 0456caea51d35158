"""MoD blocks: route the top-k channels of each sample through a narrow conv block.

Every block computes (the method in full: :mod:`mod_models.functional`)::

    s   = router(x)                      # [B, C] fp32 scores (or random keys)
    idx = top-k(s)                       # [B, k] stable, descending
    xs  = x[b, idx[b]]                   # [B, k, H, W]
    y   = f_k(xs)                        # the reduced conv block
    out = x; out[b, t[b, j]] = act(x[b, t[b, j]] + s[b, idx[b, j]] * y[b, j])

with ``k = channels // capacity``. The backend switch (``"reference"``,
``"triton"``, ``"native"``, ``"auto"``) picks who computes everything but ``f_k`` (and, for a
deployed block, ``f_k`` too); it never changes parameters or state_dict keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from . import folded
from . import functional as MF
from .backend import check_backend, default_backend, resolve_backend, resolve_deployed_backend

if TYPE_CHECKING:
    pass

NormLayer = Optional[Callable[..., nn.Module]]


class ChannelRouter(nn.Module):
    """SE-style channel scorer: ``sigmoid(fc2(relu(fc1(mean_hw(x)))))``, no biases, fp32.

    Args:
        channels: ``C``, the number of channels scored.
        reduction: hidden width is ``max(C // reduction, 1)``.
    """

    def __init__(self, channels: int, reduction: int = MF.ROUTER_REDUCTION) -> None:
        super().__init__()
        hidden = MF.router_hidden_channels(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, C, H, W]`` -> scores ``[B, C]`` float32."""
        return MF.router_scores(x, self.fc1.weight, self.fc2.weight)


class MoDBlock(nn.Module):
    """Common routing / packing / fusion of all MoD blocks; subclasses define ``f_k``.

    Args:
        channels: ``C`` of the input and output.
        capacity: ``c``; the block processes ``k = C // c`` channels per sample.
        fusion: ``"first_k"`` (default), ``"last_k"`` or ``"original"``.
        router: ``"learned"`` (SE-style router) or ``"random"`` (k random channels,
            scores of 1, no router parameters).
        backend: ``"reference"``, ``"triton"``, ``"native"``, ``"auto"``, or ``None`` for
            ``$MOD_BACKEND`` (default ``"auto"``); see :mod:`mod_models.backend`.
        inplace: ``False`` (default): the block never writes into its input. ``True``: when
            it is legal, write the result into the input tensor and touch only the ``k``
            target channels (no copy of the other ``C - k``). Legal means autograd does not
            need the input (``torch.no_grad``, ``inference_mode``, nothing requires grad), the
            input is dense, and it is not an inference tensor used outside inference mode.
            The write bumps the input's version counter, so a tensor autograd saved earlier
            makes the later backward raise instead of returning wrong gradients. Ask for it
            only where nothing else reads the input afterwards: not under reentrant activation
            checkpointing (its first forward runs under ``no_grad`` and its recomputation
            would see the overwritten input), not for a tensor a hook or feature extractor
            returns. :func:`mod_models.optimize_for_inference` turns it on for deployment.

    Attributes:
        k: channels processed per sample.
        record_selection: set True to keep each forward's ``[B, k]`` selected channel
            indices (slot order) in ``last_selection`` (routing analysis, export checks) and,
            on the reference path, the router's ``[B, C]`` fp32 scores in ``last_scores``
            (the random keys for ``router="random"``; ``None`` on the fused path, whose
            kernels do not return them).
        forced_selection: ``None`` (default), or a ``[B, k]`` int64 tensor of distinct channel
            indices per row (slot order) that the reference path uses instead of its own top-k
            ("teacher forcing": replay another implementation's routing decisions). Everything
            else is unchanged: ``w = scores.gather(1, forced)`` for the learned router (ones for
            the random one), so gradients reach the router through ``w`` as before. The fused
            path cannot take a selection: a forward that resolves to ``"triton"`` with a forced
            selection set raises ``ValueError``.
    """

    activation: str = "relu"

    def __init__(
        self,
        channels: int,
        *,
        capacity: int,
        fusion: str = "first_k",
        router: str = "learned",
        backend: Optional[str] = None,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.k = MF.selected_channels(channels, capacity)
        self.channels = channels
        self.capacity = capacity
        self.fusion = MF.check_fusion(fusion)
        self.router_type = MF.check_router(router)
        self.router = ChannelRouter(channels) if router == "learned" else None
        self.backend = default_backend() if backend is None else backend
        self.inplace = inplace
        # Routing analysis: when True, every forward keeps its selection in ``last_selection``.
        self.record_selection = False
        self.last_selection: Optional[Tensor] = None
        self.last_scores: Optional[Tensor] = None
        self._forced_selection: Optional[Tensor] = None
        # Set by mod_models.optimize_for_inference: batch norms folded, inference only (and, where
        # f_k is folded convolutions, their weights packed into one parameter: mod_models.folded).
        self.deployed = False

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend(name)

    @property
    def inplace(self) -> bool:
        return self._inplace

    @inplace.setter
    def inplace(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"inplace must be True or False, got {value!r}")
        self._inplace = value

    @property
    def forced_selection(self) -> Optional[Tensor]:
        return self._forced_selection

    @forced_selection.setter
    def forced_selection(self, selection: Optional[Tensor]) -> None:
        if selection is not None:
            check_selection(selection, self.k, self.channels)
        self._forced_selection = selection

    def process(self, xs: Tensor) -> Tensor:
        """The reduced conv block ``f_k``: ``[B, k, H, W] -> [B, k, H, W]``."""
        raise NotImplementedError

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reference routing: ``(idx [B, k] int64, w [B, k] fp32)``; ``idx`` is the forced selection when one is set."""
        forced = self._forced_selection
        if forced is not None:  # contents were checked when it was set; here only what depends on x
            check_selection(forced, self.k, self.channels, batch=x.shape[0], device=x.device, contents=False)
        if self.router is None:
            keys = MF.random_scores(x)  # drawn even when forced: the RNG stream stays the same
            idx = MF.select_top_k(keys, self.k) if forced is None else forced
            self._record_scores(keys)
            return idx, torch.ones(idx.shape, device=x.device, dtype=torch.float32)
        scores = self.router(x)
        idx = MF.select_top_k(scores, self.k) if forced is None else forced
        self._record_scores(scores)
        return idx, scores.gather(1, idx)

    def first_conv(self) -> nn.Conv2d:
        """The first convolution of ``f_k``: its weight's dtype is the dtype the block computes in."""
        raise NotImplementedError

    def _weight_dtype(self) -> torch.dtype:
        """The dtype of ``f_k``'s weights (the dtype the block computes in): of ``packed_weights`` in a
        deployed block, read without taking a view."""
        packed = self._parameters.get(folded.PACKED)
        return packed.dtype if packed is not None else self.first_conv().weight.dtype

    def _check_input_dtype(self, x: Tensor) -> None:
        dtype = self._weight_dtype()
        if x.dtype != dtype and not (
            torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
        ):
            raise TypeError(
                f"{type(self).__name__}: the input has dtype {x.dtype} but the block's parameters are "
                f"{dtype}; convert the model (e.g. model.to({x.dtype})) or run under torch.autocast"
            )

    # The fused deploy kernel's name for this block's reduced block (see mod_kernels.fused_block),
    # and whether that reduced block starts with an expansion layer (inverted residuals only).
    fused_kind: str = ""
    fused_has_expand: bool = True

    @property
    def reduced_width(self) -> int:
        """The inner width of ``f_k`` (bottleneck width, expanded width, or ``k``)."""
        raise NotImplementedError

    def folded_convs(self) -> Optional[list[nn.Conv2d]]:
        """The convolutions of ``f_k`` in order when it is exactly folded convolutions and the
        activations the fused kernel computes (norms replaced by ``nn.Identity``), else None."""
        raise NotImplementedError

    def deploy_plan(self, device: "torch.device | str | None" = None):
        """How the deployed block runs, and why.

        Args:
            device: where its input lives. Default: where the block's backend runs a deployed block
                (``"native"`` and ``"reference"``: the CPU; ``"triton"``: CUDA; ``"auto"``: CUDA when
                available, else the CPU).

        Returns:
            Backend ``"triton"`` (any device) and ``"auto"`` on CUDA: a ``mod_kernels.FusedBlockPlan``,
            the fused kernel or (with the reason) the routing kernels, the folded convolutions and the
            fusion kernel. Backends ``"native"`` and ``"auto"`` on the CPU: a
            :class:`mod_kernels.native_block.NativeBlockPlan`, the native kernel or, with the reason,
            the reference path. Backend ``"reference"``: a ``NativeBlockPlan`` saying so.
        """
        from mod_kernels import native_block

        if self.backend == "reference":
            return native_block.NativeBlockPlan(False, "backend 'reference': the folded convolutions in plain PyTorch")
        if device is None:
            cuda = self.backend == "triton" or (self.backend == "auto" and torch.cuda.is_available())
            device = "cuda" if cuda else "cpu"
        on_cpu = torch.device(device).type == "cpu"
        if self.backend == "native" and not on_cpu:
            return native_block.NativeBlockPlan(False, f"backend 'native' runs on CPU tensors only, not on {device}")
        if on_cpu and self.backend != "triton":
            return native_block.native_block_plan(
                self.fused_kind, self.channels, self.k, self.reduced_width, self._weight_dtype(),
                folded=self.folded_convs() is not None, has_expand=self.fused_has_expand,
            )
        import mod_kernels

        if self.folded_convs() is None:
            return mod_kernels.FusedBlockPlan(False, "f_k is not folded convolutions (a norm that does not fold?)")
        return mod_kernels.fused_block_plan(self.fused_kind, self.channels, self.k, self.reduced_width)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: this block becomes one graph node
            return trace_as_leaf(self, x)
        MF.check_feature_map(x, self.channels)
        self._check_input_dtype(x)
        if MF.exporting_onnx():  # one graph, whichever backend runs the block eagerly
            return self._forward_onnx(x)
        if self.deployed:
            return self._forward_deployed(x)
        if resolve_backend(self.backend, x) == "triton":
            if self._forced_selection is not None:
                raise ValueError(
                    f"{type(self).__name__}: forced_selection is set, but the backend {self.backend!r} runs the "
                    "fused Triton kernels, which choose their own selection; use backend='reference' to force one"
                )
            return self._forward_fused(x)
        return self._forward_reference(x)

    def _forward_deployed(self, x: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError(
                f"{type(self).__name__} was deployed by optimize_for_inference (batch norms folded): "
                "inference only; call .eval()"
            )
        if torch.is_grad_enabled() and MF.autograd_needs(x, *self.parameters()):
            raise RuntimeError(
                f"{type(self).__name__} was deployed by optimize_for_inference: its forward does not support "
                "autograd; run under torch.inference_mode() or torch.no_grad()"
            )
        path = resolve_deployed_backend(self.backend, x)
        if path == "native":
            return self._forward_native(x)
        if path != "triton":
            return self._forward_reference(x)
        if self._forced_selection is not None:
            raise ValueError(f"{type(self).__name__}: forced_selection needs backend='reference'")
        plan = self.deploy_plan("cuda")
        if not plan.fused:
            return self._forward_fused(x)
        import mod_kernels

        # The kernel reads the block's own tensors (one copy of the weights, never a cache).
        params = folded.packed_weights(self)
        if self.router is None:
            router = dict(scores=MF.random_scores(x))
        else:
            router = dict(fc1_weight=self.router.fc1.weight, fc2_weight=self.router.fc2.weight)
        out, idx, _, scores = mod_kernels.fused_block_forward(
            x, self.fused_kind, params, self.k, self.reduced_width, dilation=self.dilation,
            fusion=self.fusion, activation=self.activation,
            inplace=self._writes_in_place() and MF.may_write_in_place(x), has_expand=self.fused_has_expand, **router,
        )
        self._record(idx)
        self._record_scores(scores)
        return out

    def _forward_native(self, x: Tensor) -> Tensor:
        """A deployed block on CPU tensors: the native kernel in one call, or the reference path
        where :meth:`deploy_plan` says the kernel does not take the block."""
        from mod_kernels import native_block

        convs = self.folded_convs()
        plan = native_block.native_block_plan(
            self.fused_kind, self.channels, self.k, self.reduced_width, self._weight_dtype(),
            folded=convs is not None, has_expand=self.fused_has_expand,
        )
        if not plan.native:
            return self._forward_reference(x)
        if x.dtype not in native_block.KERNEL_DTYPES:
            raise TypeError(
                f"{type(self).__name__}: the native kernel takes float32/float16/bfloat16 input, got {x.dtype}"
            )
        if self._forced_selection is not None:
            raise ValueError(
                f"{type(self).__name__}: forced_selection is set, but the deployed block runs the native kernel "
                f"(backend {self.backend!r}), which chooses its own selection; use backend='reference' to force one"
            )
        if self.router is None:
            fc1, fc2, scores = None, None, MF.random_scores(x)
        else:
            fc1, fc2, scores = self.router.fc1.weight, self.router.fc2.weight, None
        out, idx, _, scores = native_block.native_block_dispatch(
            x, self.fused_kind, *folded.folded_weights(self), self.k,
            self.reduced_width, self.dilation, self.fusion, self.activation == "relu", fc1, fc2, scores,
            self._writes_in_place() and MF.may_write_in_place(x), self.fused_has_expand,
        )
        self._record(idx)
        self._record_scores(scores)
        return out

    def _forward_reference(self, x: Tensor, *, functional: bool = False) -> Tensor:
        idx, w = self.route(x)
        self._record(idx)
        y = self.process(MF.gather_channels(x, idx))
        inplace = not functional and self._may_write_input(x, y, w)
        return MF.scale_and_fuse(x, y, w, idx, fusion=self.fusion, activation=self.activation, inplace=inplace)

    def _forward_onnx(self, x: Tensor) -> Tensor:
        """The block as ``torch.onnx.export`` records it: the reference path, whatever the backend (ONNX
        spells its ops: TopK for the stable sort, GatherND and ScatterND for the k planes), never in place."""
        if self.router is None:
            raise ValueError(
                f"{type(self).__name__} routes randomly (router='random'): it draws its channels from PyTorch's "
                "RNG at every call, which an ONNX model cannot reproduce; export a model trained with the learned "
                "router"
            )
        return self._forward_reference(x, functional=True)

    def _forward_fused(self, x: Tensor) -> Tensor:
        import mod_kernels

        inplace = self._writes_in_place() and MF.may_write_in_place(x) and not MF.autograd_needs(x, *self.parameters())
        if self.router is None:
            router = dict(scores=MF.random_scores(x))
        else:
            router = dict(fc1_weight=self.router.fc1.weight, fc2_weight=self.router.fc2.weight)
        out, idx = mod_kernels.routed_block(
            x, self.k, self.process, fusion=self.fusion, activation=self.activation, inplace=inplace, **router
        )
        self._record(idx)
        if self.record_selection:
            self.last_scores = None  # the kernels keep their scores to themselves
        return out

    def _may_write_input(self, x: Tensor, y: Tensor, w: Tensor) -> bool:
        """In-place fusion happens only when asked for (``inplace=True``) and legal: autograd does
        not need the input, ``x`` owns its memory densely (an expanded or overlapping view cannot
        be written element by element), and ``x`` is not an inference tensor outside inference
        mode (PyTorch forbids updating those)."""
        if not self._writes_in_place():
            return False
        return MF.may_write_in_place(x) and not MF.autograd_needs(x, y, w)

    def _writes_in_place(self) -> bool:
        """``inplace=True``, except for a deployed block with ``"original"`` fusion, which returns a
        new tensor on every backend (the fused kernel cannot write the selected channels while other
        programs still read them; the other backends do as it does)."""
        return self._inplace and not (self.deployed and self.fusion == "original")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if folded.is_packed(self):  # a deploy-form state dict with per-convolution keys still loads
            folded.per_conv_keys_to_packed(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _record(self, idx: Tensor) -> None:
        if self.record_selection:
            self.last_selection = idx.detach()

    def _record_scores(self, scores: Tensor) -> None:
        if self.record_selection:
            self.last_scores = scores.detach()

    def __prepare_scriptable__(self) -> "MoDBlock":
        """``torch.jit.script`` calls this on every module first: refuse, saying what works instead."""
        raise RuntimeError(
            f"{type(self).__name__}: TorchScript (torch.jit.script) cannot compile a MoD block (its forward checks "
            "inputs and picks a backend in Python), and PyTorch deprecates TorchScript. Export with torch.export "
            "(torch.export.export, or mod_models.tools.export.export_program for a .pt2 with a dynamic batch) or to "
            "ONNX (torch.onnx.export(model, (x,), path, dynamo=True), or mod_models.tools.export.export_onnx); "
            "in Python, torch.compile(model)"
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, k={self.k}, capacity={self.capacity}, fusion={self.fusion!r}, "
            f"router={self.router_type!r}, backend={self.backend!r}"
        )


def trace_as_leaf(block: MoDBlock, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Record ``block`` as a single ``call_module`` node of the graph ``torch.fx`` is tracing.

    A MoD block's forward is data-dependent Python (input checks, backend dispatch, the
    in-place legality test), so it cannot be traced through. As one node, the traced graph
    calls the block itself, which then runs exactly as in eager mode; this is what
    ``torch.fx.symbolic_trace``, ``create_feature_extractor`` and ``get_graph_node_names``
    do with any leaf module (the node is named by the block's path, e.g. ``"layer1.1"``).

    A block with ``inplace=True`` (built so, or deployed) is called on a copy of its input (a
    ``clone`` node before it): other nodes of the graph may read or return that input (a feature
    extractor returning ``"layer1.0"``, which feeds ``"layer1.1"``), and the block must not
    overwrite it. Tracing changes nothing in the model.

    Raises:
        TypeError: the block is the root of the trace (there is no path to call it by).
    """
    path = x.tracer.path_of_module(block)
    if not path:
        raise TypeError(
            f"{type(block).__name__} cannot be traced on its own by torch.fx (it is traced as a leaf "
            "module); trace a model that contains it, e.g. torch.nn.Sequential(block)"
        )
    if block.inplace:
        x = x.tracer.create_proxy("call_function", torch.clone, (x,), {})
    return x.tracer.create_proxy("call_module", path, (x,), {})


def check_dilation(dilation: int) -> int:
    """``dilation`` of a 3x3 convolution: an int >= 1."""
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    return dilation


class MoDBottleneck(MoDBlock):
    """MoD ResNet Bottleneck: ``f_k`` = 1x1 k->max(k/4, 1), 3x3, 1x1 ->k, each with BN; ReLU after fusion.

    Args:
        channels: block width ``C`` (``planes * 4`` of the Bottleneck it replaces).
        dilation: dilation of the 3x3 conv (torchvision's ``replace_stride_with_dilation``).
        norm_layer: normalisation layer factory (default ``nn.BatchNorm2d``).
        (Other keywords: see :class:`MoDBlock`.)
    """

    def __init__(
        self,
        channels: int,
        *,
        capacity: int = 64,
        fusion: str = "first_k",
        router: str = "learned",
        backend: Optional[str] = None,
        norm_layer: NormLayer = None,
        dilation: int = 1,
        inplace: bool = False,
    ) -> None:
        super().__init__(channels, capacity=capacity, fusion=fusion, router=router, backend=backend, inplace=inplace)
        check_dilation(dilation)
        norm_layer = norm_layer or nn.BatchNorm2d
        width = max(self.k // 4, 1)
        self.conv1 = nn.Conv2d(self.k, width, kernel_size=1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, self.k, kernel_size=1, bias=False)
        self.bn3 = norm_layer(self.k)
        self.relu = nn.ReLU(inplace=True)
        self.dilation = dilation

    fused_kind = "bottleneck"

    @property
    def reduced_width(self) -> int:
        return self.conv1.out_channels

    def folded_convs(self) -> Optional[list[nn.Conv2d]]:
        norms = (self.bn1, self.bn2, self.bn3)
        if all(isinstance(n, nn.Identity) for n in norms) and type(self.relu) is nn.ReLU:
            return [self.conv1, self.conv2, self.conv3]
        return None

    def first_conv(self) -> nn.Conv2d:
        return self.conv1

    def process(self, xs: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(xs)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class MoDBasicBlock(MoDBlock):
    """MoD ResNet BasicBlock: ``f_k`` = 3x3 k->k, BN, ReLU, 3x3 k->k, BN; ReLU after fusion.

    Args: see :class:`MoDBottleneck`.
    """

    def __init__(
        self,
        channels: int,
        *,
        capacity: int = 64,
        fusion: str = "first_k",
        router: str = "learned",
        backend: Optional[str] = None,
        norm_layer: NormLayer = None,
        dilation: int = 1,
        inplace: bool = False,
    ) -> None:
        super().__init__(channels, capacity=capacity, fusion=fusion, router=router, backend=backend, inplace=inplace)
        check_dilation(dilation)
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(self.k, self.k, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm_layer(self.k)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(self.k, self.k, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(self.k)
        self.dilation = dilation

    fused_kind = "basic"

    @property
    def reduced_width(self) -> int:
        return self.k

    def folded_convs(self) -> Optional[list[nn.Conv2d]]:
        if isinstance(self.bn1, nn.Identity) and isinstance(self.bn2, nn.Identity) and type(self.relu) is nn.ReLU:
            return [self.conv1, self.conv2]
        return None

    def first_conv(self) -> nn.Conv2d:
        return self.conv1

    def process(self, xs: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(xs)))
        return self.bn2(self.conv2(out))


class MoDInvertedResidual(MoDBlock):
    """MoD MobileNetV2 block: ``f_k`` = 1x1 k->t*k, BN, ReLU6, 3x3 depthwise, BN, ReLU6, 1x1 ->k, BN.

    The fusion is linear (no activation), as in MobileNetV2's residual.

    Args:
        channels: block width ``C``.
        expand_ratio: ``t``, the expansion of the reduced block (default 6).
        (Other keywords: see :class:`MoDBottleneck`.)
    """

    activation = "none"

    def __init__(
        self,
        channels: int,
        *,
        capacity: int = 16,
        expand_ratio: int = 6,
        fusion: str = "first_k",
        router: str = "learned",
        backend: Optional[str] = None,
        norm_layer: NormLayer = None,
        inplace: bool = False,
    ) -> None:
        super().__init__(channels, capacity=capacity, fusion=fusion, router=router, backend=backend, inplace=inplace)
        if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, int) or expand_ratio < 1:
            raise ValueError(f"expand_ratio must be an int >= 1, got {expand_ratio!r}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.expand_ratio = expand_ratio
        hidden = self.k * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(self.k, hidden, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=1, groups=hidden, norm_layer=norm_layer,
                                 activation_layer=nn.ReLU6),
            nn.Conv2d(hidden, self.k, 1, 1, 0, bias=False),
            norm_layer(self.k),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = channels

    fused_kind = "inverted"
    dilation = 1

    @property
    def fused_has_expand(self) -> bool:
        return self.expand_ratio != 1

    @property
    def reduced_width(self) -> int:
        return self.k * self.expand_ratio

    def folded_convs(self) -> Optional[list[nn.Conv2d]]:
        *stages, project, norm = self.conv
        convs = []
        for stage in stages:  # Conv2dNormActivation: conv, folded norm, ReLU6
            conv, stage_norm, activation = stage
            if not (isinstance(stage_norm, nn.Identity) and type(activation) is nn.ReLU6):
                return None
            convs.append(conv)
        if not isinstance(norm, nn.Identity):
            return None
        return convs + [project]

    def first_conv(self) -> nn.Conv2d:
        return self.conv[0][0]

    def process(self, xs: Tensor) -> Tensor:
        return self.conv(xs)


def set_backend(model: nn.Module, name: str) -> nn.Module:
    """Set ``backend`` on every MoD block inside ``model``; returns ``model``."""
    check_backend(name)
    found = 0
    for module in model.modules():
        if isinstance(module, MoDBlock):
            module.backend = name
            found += 1
    if found == 0:
        raise ValueError(f"{type(model).__name__} contains no MoD blocks to set the backend on")
    return model


def check_selection(
    selection: Tensor,
    k: int,
    channels: int,
    *,
    batch: Optional[int] = None,
    device: Optional[torch.device] = None,
    contents: bool = True,
) -> None:
    """Raise a clear error unless ``selection`` is a ``[B, k]`` int64 tensor of distinct channels in ``[0, channels)``.

    ``batch`` / ``device``: also demand that many rows / that device. ``contents=False`` skips the
    range and distinctness checks (they read the values, a device sync on CUDA).
    """
    if not isinstance(selection, Tensor):
        raise TypeError(f"forced_selection must be a torch.Tensor or None, got {type(selection).__name__}")
    if selection.dtype != torch.int64:
        raise TypeError(f"forced_selection must be an int64 tensor, got dtype {selection.dtype}")
    if selection.dim() != 2 or selection.shape[1] != k:
        raise ValueError(f"forced_selection must have shape [B, k] with k={k}, got shape {tuple(selection.shape)}")
    if batch is not None and selection.shape[0] != batch:
        raise ValueError(f"forced_selection has {selection.shape[0]} rows but the input batch is {batch}")
    if device is not None and selection.device != device:
        raise ValueError(f"forced_selection is on {selection.device} but the input is on {device}")
    if contents:
        MF.check_index_rows(selection, channels, "forced_selection")


def init_conv_and_norm(module: nn.Module) -> None:
    """torchvision's ResNet/MobileNetV2 init: Kaiming-normal (fan_out) convs, norm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def last_norm(block: MoDBlock) -> nn.Module:
    """The norm layer that ends ``f_k`` (zeroed by ``zero_init_residual``)."""
    if isinstance(block, MoDBottleneck):
        return block.bn3
    if isinstance(block, MoDBasicBlock):
        return block.bn2
    return block.conv[-1]
