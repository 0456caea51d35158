"""Bytes each fused MoD op must move through device memory: the numerator of achieved GB/s.

Notation: ``B`` batch, ``C`` channels, ``N = H * W`` pixels, ``k = C // capacity`` selected
channels, ``C_h = max(C // 16, 1)`` router width, ``e`` bytes per feature-map element (4 fp32,
2 bf16/fp16), ``e_w`` bytes per router-weight element (the weights live in the model's dtype).
Index tensors are int64 (``idx``, 8 bytes), scores fp32 (4 bytes), ``selected_slot`` int32.

Each formula counts every tensor the op's contract makes it read once and write once (the
"fewest bytes" of METHOD.md); a fused implementation that moves more (re-reads, extra
passes) shows up as lower GB/s. The same byte count is used for every provider, so for the
unfused reference the GB/s is an *effective* bandwidth.

================================  =============================================================
op                                bytes
================================  =============================================================
route+pack forward                e*B*N*(C + 2k)       read x once for the pooled scores, read
                                                       the k selected channels again, write xs
                                  + 2*e_w*C*C_h        router weights read
                                  + 12*B*k + 4*B*C     idx (int64) + w (fp32), selected_slot
route+pack backward               e*B*N*(k + C)        read grad_xs, write grad_x (pooled
                                                       gradient broadcast + scattered grad_xs)
                                  + 4*e_w*C*C_h        router weights read, their grads written
                                  + 4*B*k + 8*B*C      grad_w read; selected_slot and fp32
                                                       scores read
scale+fuse forward, in place      e*B*N*3k             read x's k target channels and y, write
                                                       the k target channels back
                                  + 4*B*k (+ 8*B*k)    w (+ idx when fusion="original")
scale+fuse forward, out of place  e*B*N*(2C + k)       read x and y, write out
                                  + 4*B*k (+ 8*B*k)
scale+fuse backward               e*B*N*(2C + 2k + a)  read grad_out, write grad_x (C each),
                                                       read y (for grad_w), write grad_y; a = k
                                                       to read the saved output's k target
                                                       channels for ReLU's mask, 0 without
                                                       activation
                                  + 8*B*k (+ 8*B*k)    w read, grad_w written (+ idx)
route+fuse forward (inference)    route+pack fwd + scale+fuse fwd in place (y = xs)
route+fuse forward+backward       route+pack fwd + scale+fuse fwd out of place
                                  + e*B*N*(2C + 3k + a) the chain's backward: read grad_out and
                                                       write grad_x once (C each), read y and
                                                       grad_xs, write grad_y (k each), a = k for
                                                       ReLU's mask; the targets' own gradient is
                                                       internal to the chain and not counted
                                  + 4*e_w*C*C_h + 8*B*k + 8*B*C (+ 8*B*k)  router weights and
                                                       their grads, w / grad_w, slots and scores
                                                       (+ idx)
deployed block (inference)        e*B*N*(C + 2k)       read x once (pooling), read the k
                                                       selected channels again, write the k
                                                       target channels: the whole block, f_k
                                                       included, in the deploy form
                                  + 2*e_w*C*C_h        router weights read
                                  + 12*B*k             idx (int64) + w (fp32) written
================================  =============================================================

The deployed block's implementation moves ``2k`` planes more than its contract (a snapshot of the
k target channels, written and read back, so that the in-place update cannot race with reads of
the selected channels); the fewest bytes any implementation needs is the contract above, so its
GB/s and copy fraction say how close the three launches come to one pass over the feature map.
The training-mode whole-block ops get no byte count: their time is not bandwidth-bound in a way
this model describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IDX_BYTES = 8
SCORE_BYTES = 4
SLOT_BYTES = 4


@dataclass(frozen=True)
class FeatureShape:
    """A MoD block's input ``[B, C, H, W]`` with ``k`` selected channels."""

    batch: int
    channels: int
    height: int
    width: int
    k: int
    element_bytes: int
    weight_bytes: int
    router_hidden: int

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @classmethod
    def of(cls, batch: int, channels: int, height: int, width: int, *, capacity: int, dtype: torch.dtype,
           weight_dtype: torch.dtype | None = None, reduction: int = 16) -> FeatureShape:
        element = torch.empty((), dtype=dtype).element_size()
        weight = torch.empty((), dtype=weight_dtype or dtype).element_size()
        return cls(batch, channels, height, width, channels // capacity, element, weight, max(channels // reduction, 1))


def _map(s: FeatureShape, channel_count: int) -> int:
    """Bytes of ``channel_count`` channel planes of the whole batch."""
    return s.element_bytes * s.batch * s.pixels * channel_count


def _router_weights(s: FeatureShape) -> int:
    return 2 * s.weight_bytes * s.channels * s.router_hidden


def route_pack_forward(s: FeatureShape) -> int:
    return (_map(s, s.channels + 2 * s.k) + _router_weights(s)
            + (IDX_BYTES + SCORE_BYTES) * s.batch * s.k + SLOT_BYTES * s.batch * s.channels)


def route_pack_backward(s: FeatureShape) -> int:
    return (_map(s, s.k + s.channels) + 2 * _router_weights(s)
            + SCORE_BYTES * s.batch * s.k + (SLOT_BYTES + SCORE_BYTES) * s.batch * s.channels)


def scale_fuse_forward(s: FeatureShape, *, inplace: bool, fusion: str = "first_k") -> int:
    feature = _map(s, 3 * s.k) if inplace else _map(s, 2 * s.channels + s.k)
    return feature + SCORE_BYTES * s.batch * s.k + (IDX_BYTES * s.batch * s.k if fusion == "original" else 0)


def scale_fuse_backward(s: FeatureShape, *, activation: str = "relu", fusion: str = "first_k") -> int:
    mask = s.k if activation != "none" else 0
    return (_map(s, 2 * s.channels + 2 * s.k + mask) + 2 * SCORE_BYTES * s.batch * s.k
            + (IDX_BYTES * s.batch * s.k if fusion == "original" else 0))


def route_fuse_forward(s: FeatureShape, *, fusion: str = "first_k") -> int:
    return route_pack_forward(s) + scale_fuse_forward(s, inplace=True, fusion=fusion)


def route_fuse_backward(s: FeatureShape, *, activation: str = "relu", fusion: str = "first_k") -> int:
    """The whole chain's backward: one read of grad_out and one write of grad_x, plus k-channel terms."""
    mask = s.k if activation != "none" else 0
    return (_map(s, 2 * s.channels + 3 * s.k + mask) + 2 * _router_weights(s)
            + 2 * SCORE_BYTES * s.batch * s.k + (SLOT_BYTES + SCORE_BYTES) * s.batch * s.channels
            + (IDX_BYTES * s.batch * s.k if fusion == "original" else 0))


def route_fuse_forward_backward(s: FeatureShape, *, activation: str = "relu", fusion: str = "first_k") -> int:
    return (route_pack_forward(s) + scale_fuse_forward(s, inplace=False, fusion=fusion)
            + route_fuse_backward(s, activation=activation, fusion=fusion))


def deployed_block_forward(s: FeatureShape) -> int:
    """The whole deployed MoD block at inference (its contract: see the module docstring)."""
    return _map(s, s.channels + 2 * s.k) + _router_weights(s) + (IDX_BYTES + SCORE_BYTES) * s.batch * s.k


def op_bytes(op: str, s: FeatureShape, *, activation: str = "relu", fusion: str = "first_k") -> int | None:
    """Bytes for a kernel-benchmark op name (``None`` for whole-block ops)."""
    table = {
        "route_pack.fwd": lambda: route_pack_forward(s),
        "route_pack.bwd": lambda: route_pack_backward(s),
        "scale_fuse.fwd": lambda: scale_fuse_forward(s, inplace=True, fusion=fusion),
        "scale_fuse.bwd": lambda: scale_fuse_backward(s, activation=activation, fusion=fusion),
        "route_fuse.fwd": lambda: route_fuse_forward(s, fusion=fusion),
        "route_fuse.fwdbwd": lambda: route_fuse_forward_backward(s, activation=activation, fusion=fusion),
        "block.deploy": lambda: deployed_block_forward(s),
    }
    return table[op]() if op in table else None
