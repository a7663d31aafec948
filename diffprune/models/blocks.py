"""Modules that stand in for dropped diffusers sub-blocks, and can be rebuilt from a checkpoint.

A pruned network may hold them in place of a ``ResnetBlock2D`` or an ``Attention``. Each records
what it needs to be rebuilt in :meth:`structure_init`;
:data:`diffprune.models.checkpoint.REPLACEMENTS` names every one of them, so loading a checkpoint
needs no other import.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def resnet_skip(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a resnet computes with its residual branch dropped: ``shortcut(x) / output_scale_factor``.

    Args:
        m: a diffusers ``ResnetBlock2D``, or the :class:`ShortcutBlock` that replaces one (both
            have ``conv_shortcut``, possibly None, and ``output_scale_factor``).
        x: ``(B, C_in, H, W)`` the block input.

    Returns:
        ``(B, C_out, H, W)``.
    """
    if m.conv_shortcut is not None:
        x = m.conv_shortcut(x.contiguous())
    return x / m.output_scale_factor if m.output_scale_factor != 1 else x


class SkippedBlock(nn.Module):
    """A dropped residual sub-block: returns its input ``(B, C, H, W)`` unchanged, costs nothing.

    Args:
        channels: width of the residual stream it sits on (recorded for the checkpoint).
        kind: ``"resnet"`` or ``"attention"``, the sub-block it replaces.
    """

    def __init__(self, channels: int, kind: str) -> None:
        super().__init__()
        self.channels = int(channels)
        self.kind = str(kind)

    def structure_init(self) -> dict[str, Any]:
        """The constructor arguments a checkpoint records to rebuild this block."""
        return {"channels": self.channels, "kind": self.kind}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def extra_repr(self) -> str:
        return f"{self.kind}, channels={self.channels}"


class ZeroBranch(nn.Module):
    """A dropped branch of a transformer block (its attention or feed-forward, whose output the block
    adds to its residual stream): returns zeros of its input's shape, costs nothing.

    Args:
        kind: ``"attention"`` or ``"mlp"``, the branch it replaces.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = str(kind)

    def structure_init(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)

    def extra_repr(self) -> str:
        return self.kind


class ShortcutBlock(nn.Module):
    """A resnet whose residual branch was dropped: ``conv_shortcut(x) / output_scale_factor``.

    Args:
        in_channels, out_channels, kernel_size, bias: of the shortcut conv (stride 1, same padding).
        output_scale_factor: the resnet's output scale.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True,
                 output_scale_factor: float = 1.0) -> None:
        super().__init__()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.output_scale_factor = float(output_scale_factor)

    @classmethod
    def of(cls, resnet: nn.Module) -> "ShortcutBlock":
        """The shortcut of a diffusers ``ResnetBlock2D``, with its weights."""
        conv = resnet.conv_shortcut
        k = conv.kernel_size[0]
        if conv.kernel_size != (k, k) or conv.stride != (1, 1) or conv.padding != (k // 2, k // 2) or conv.groups != 1:
            raise NotImplementedError(f"shortcut conv {conv} is not a stride-1, same-padding square conv")
        new = cls(conv.in_channels, conv.out_channels, k, conv.bias is not None, resnet.output_scale_factor)
        new.conv_shortcut.load_state_dict(conv.state_dict())
        return new.to(conv.weight.device, conv.weight.dtype)

    def structure_init(self) -> dict[str, Any]:
        """The constructor arguments a checkpoint records to rebuild this block."""
        c = self.conv_shortcut
        return {"in_channels": c.in_channels, "out_channels": c.out_channels, "kernel_size": c.kernel_size[0],
                "bias": c.bias is not None, "output_scale_factor": self.output_scale_factor}

    def forward(self, input_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H, W)``: what the elastic depth gate runs for a dropped resnet."""
        return resnet_skip(self, input_tensor)
