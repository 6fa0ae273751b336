"""The SAMv2 embedding network in plain PyTorch: a 3D ResNet-18 backbone and three
feature-pyramid heads (fine appearance, coarse appearance, semantic).

Architecture (from the public SAM / SAMv2 reference configuration):

* backbone: stem conv (3,7,7) stride 1 + BN + ReLU, no stem pooling; four stages of two
  basic residual blocks with spatial (y, x) stride 2 each and z stride 1,1,1,2; a z-only
  max-pool (2,1,1) after stage 1; stages 1-2 use (1,3,3) convolutions, stages 3-4 (3,3,3).
  Output strides (z, y, x): stage1 (2,2,2), stage2 (2,4,4), stage3 (2,8,8), stage4 (4,16,16).
* fine head (``neck``): FPN over stages 1-3: 1x1x1 laterals, nearest top-down sum, one
  3x3x3 conv on the finest level -> ``embed_dim`` channels at (D/2, H/2, W/2).
* coarse head (``read_out_head``): the same on stage 4 alone -> (D/4, H/16, W/16).
* semantic head (``semantic_head``, SAMv2 / CrossSAM only): a second fine head.

Every output is L2-normalised over channels.

Module names deliberately follow the official mmcv checkpoints (``backbone.conv1.conv``,
``backbone.layer1.0.conv1.bn``, ``neck.lateral_convs.0.conv`` ...) so that
:func:`samv2core.model_io.convert_official_checkpoint` needs no renaming beyond dropping
unused entries; the shapes are then checked one by one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InputError

HEADS_WITH_SEMANTIC = ("fine", "coarse", "semantic")
HEADS_WITHOUT_SEMANTIC = ("fine", "coarse")


@dataclass(frozen=True)
class NetConfig:
    """Architecture hyper-parameters; everything needed to rebuild the network."""

    variant: str
    stage_channels: tuple[int, int, int, int]
    fpn_channels: int
    embed_dim: int
    semantic_head: bool = True

    def __post_init__(self):
        sc = tuple(int(c) for c in self.stage_channels)
        if len(sc) != 4 or min(sc) <= 0:
            raise InputError(f"stage_channels must be 4 positive ints, got {self.stage_channels!r}")
        if int(self.fpn_channels) <= 0 or int(self.embed_dim) <= 0:
            raise InputError(f"fpn_channels/embed_dim must be positive, got {self.fpn_channels}/{self.embed_dim}")
        # Frozen dataclass: normalise list -> tuple so configs compare equal after JSON.
        object.__setattr__(self, "stage_channels", sc)
        object.__setattr__(self, "fpn_channels", int(self.fpn_channels))
        object.__setattr__(self, "embed_dim", int(self.embed_dim))
        object.__setattr__(self, "semantic_head", bool(self.semantic_head))

    @classmethod
    def full(cls, semantic_head: bool = True) -> "NetConfig":
        """The reference size (ResNet-18 64/128/256/512, 128-d heads, ~33M parameters)."""
        return cls("full", (64, 128, 256, 512), 128, 128, semantic_head)

    @classmethod
    def lite(cls, semantic_head: bool = True) -> "NetConfig":
        """A narrow variant for fast CPU inference (same layout, fewer channels)."""
        return cls("lite", (16, 32, 64, 128), 32, 64, semantic_head)

    @property
    def heads(self) -> tuple[str, ...]:
        return HEADS_WITH_SEMANTIC if self.semantic_head else HEADS_WITHOUT_SEMANTIC

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stage_channels"] = list(self.stage_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], error: type[Exception] = CheckpointError) -> "NetConfig":
        """Rebuild from :meth:`to_dict` output; unknown or missing keys raise ``error``."""
        if not isinstance(d, Mapping):
            raise error(f"architecture must be a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name != "semantic_head"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise error(f"unknown architecture keys: {', '.join(unknown)}")
        missing = sorted(required - set(d))
        if missing:
            raise error(f"missing architecture keys: {', '.join(missing)}")
        try:
            return cls(**{k: (tuple(v) if k == "stage_channels" else v) for k, v in d.items()})
        except (TypeError, ValueError, InputError) as exc:
            raise error(f"invalid architecture {dict(d)!r}: {exc}") from None


class ConvBN(nn.Module):
    """Bias-free conv + BatchNorm3d (+ optional ReLU); attributes ``conv``/``bn`` as in mmcv."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm3d(cout)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x


class Conv(nn.Module):
    """Plain conv with bias, wrapped so its key is ``<name>.conv.weight`` as in mmcv."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, padding=padding, bias=True)

    def forward(self, x):
        return self.conv(x)


class BasicBlock(nn.Module):
    """ResNet basic block; ``inflate`` selects (3,3,3) instead of (1,3,3) kernels."""

    def __init__(self, cin: int, cout: int, stride_z: int, stride_xy: int, inflate: bool):
        super().__init__()
        k, p = ((3, 3, 3), (1, 1, 1)) if inflate else ((1, 3, 3), (0, 1, 1))
        stride = (stride_z, stride_xy, stride_xy)
        self.conv1 = ConvBN(cin, cout, k, stride, p, relu=True)
        self.conv2 = ConvBN(cout, cout, k, 1, p, relu=False)
        # As in the reference, a projection shortcut whenever the spatial stride is not 1
        # (including stage 1, whose channel count does not change).
        self.downsample = (ConvBN(cin, cout, 1, stride, 0, relu=False)
                           if stride_xy != 1 or stride_z != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + identity, inplace=True)


class ResNet3d18(nn.Module):
    """3D ResNet-18 returning the four stage outputs."""

    Z_STRIDES = (1, 1, 1, 2)
    INFLATE = (False, False, True, True)

    def __init__(self, stage_channels: tuple[int, int, int, int], in_channels: int = 1):
        super().__init__()
        c0 = stage_channels[0]
        self.conv1 = ConvBN(in_channels, c0, (3, 7, 7), 1, (1, 3, 3), relu=True)
        cin = c0
        for i, cout in enumerate(stage_channels):
            blocks = [BasicBlock(cin, cout, self.Z_STRIDES[i], 2, self.INFLATE[i]),
                      BasicBlock(cout, cout, 1, 1, self.INFLATE[i])]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout

    def forward(self, x):
        x = self.conv1(x)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i == 0:
                # z-only pooling after stage 1 (the reference's "pool2").
                x = F.max_pool3d(x, kernel_size=(2, 1, 1), stride=(2, 1, 1))
            outs.append(x)
        return outs


class FPNHead(nn.Module):
    """FPN producing only its finest level: 1x1x1 laterals, nearest top-down, 3x3x3 out conv."""

    def __init__(self, in_channels: list[int], fpn_channels: int, out_channels: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList(Conv(c, fpn_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList([Conv(fpn_channels, out_channels, 3, padding=1)])

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        return self.fpn_convs[0](lat[0])


# The network's output strides, (z, y, x) input voxels per output voxel: the one definition
# (embedding, MIND-SSC descriptors and training read them from here).
FINE_STRIDE = (2, 2, 2)
COARSE_STRIDE = (4, 16, 16)
INPUT_MULTIPLE = (4, 16, 16)  # input (Z, Y, X) must be multiples of these


class SAMv2Net(nn.Module):
    """SAM / SAMv2 embedding network. ``forward`` returns L2-normalised embeddings."""

    fine_stride = FINE_STRIDE
    coarse_stride = COARSE_STRIDE
    input_multiple = INPUT_MULTIPLE

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        c = config.stage_channels
        self.backbone = ResNet3d18(c)
        self.neck = FPNHead(list(c[:3]), config.fpn_channels, config.embed_dim)
        self.read_out_head = FPNHead([c[3]], config.fpn_channels, config.embed_dim)
        if config.semantic_head:
            self.semantic_head = FPNHead(list(c[:3]), config.fpn_channels, config.embed_dim)
        self._init_weights()

    def _init_weights(self):
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv3d):
                if name.startswith("backbone"):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def heads(self) -> tuple[str, ...]:
        return self.config.heads

    def check_input(self, x: torch.Tensor) -> None:
        """Raise InputError unless ``x`` is (B, 1, Z, Y, X) with dims multiples of input_multiple."""
        if x.dim() != 5 or x.shape[1] != 1:
            raise InputError(f"network input must be (B, 1, Z, Y, X), got shape {tuple(x.shape)}")
        bad = [n for n, m in zip(x.shape[2:], self.input_multiple) if n % m or n == 0]
        if bad:
            raise InputError(f"network input shape {tuple(x.shape)} (Z, Y, X) must be non-zero multiples "
                             f"of {self.input_multiple}")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dict head -> (B, embed_dim, ...) unit-norm embeddings ('fine', 'coarse'[, 'semantic'])."""
        self.check_input(x)
        feats = self.backbone(x)
        out = {"fine": self.neck(feats[:3]), "coarse": self.read_out_head(feats[3:])}
        if self.config.semantic_head:
            out["semantic"] = self.semantic_head(feats[:3])
        # Normalise in fp32 so that bf16/fp16 autocast does not degrade unit norms.
        return {k: F.normalize(v.float(), dim=1) for k, v in out.items()}


def build_network(config: NetConfig) -> SAMv2Net:
    """A freshly initialised SAMv2Net for ``config`` (train mode, CPU)."""
    if not isinstance(config, NetConfig):
        raise InputError(f"build_network needs a NetConfig, got {type(config).__name__}")
    return SAMv2Net(config)


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters."""
    return sum(p.numel() for p in model.parameters())
