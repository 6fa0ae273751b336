"""Tests for samv2core.model_io: safetensors + model card round trips, integrity checks, and
conversion of official (mmcv) SAM / SAMv2 / CrossSAM checkpoints.

The official weights cannot be downloaded here, so conversion is tested on a synthetic state
dict built *independently of our module names* from a reading of the reference code
(sam/models/backbones/resnet3d.py, sam/models/necks/fpn3d.py and configs/samv2/*.py), and
its outputs are compared with a functional re-implementation of the reference forward pass.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samv2core.errors import CheckpointError, InputError
from samv2core.model_io import (ModelCard, bundled_model_path, card_path_for, convert_official_checkpoint,
                                default_model, load_model, read_card, save_model, sha256_of)
from samv2core.network import NetConfig, build_network

torch.set_num_threads(2)

REF_STAGES = (64, 128, 256, 512)
Z_STRIDES = (1, 1, 1, 2)      # temporal_strides in the reference config
INFLATED = (False, False, True, True)  # inflate=((0,0),(0,0),(1,1),(1,1))
SMALL = (8, 16, 16, 32)       # narrow layout for the (fast) failure tests


# ------------------------------------------------------------------------------------------
# Reference layout, written from the reference code (not from samv2core.network)
# ------------------------------------------------------------------------------------------

def _bn(sd, prefix, c, g):
    sd[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.running_mean"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.running_var"] = 0.5 + torch.rand(c, generator=g)
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(20000)


def _conv(sd, prefix, shape, g, bias):
    fan_in = shape[1] * int(np.prod(shape[2:]))
    sd[f"{prefix}.weight"] = torch.randn(*shape, generator=g) * (2.0 / fan_in) ** 0.5
    if bias:
        sd[f"{prefix}.bias"] = 0.1 * torch.randn(shape[0], generator=g)


def reference_state_dict(stages=REF_STAGES, out=128, semantic=True, seed=0) -> "OrderedDict[str, torch.Tensor]":
    """An mmcv SAM/SAMv2 state dict: ResNet3d(depth 18) ConvModules (conv + bn, no conv
    bias), FPN3d ConvModules without norm (conv with bias)."""
    g = torch.Generator().manual_seed(seed)
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    _conv(sd, "backbone.conv1.conv", (stages[0], 1, 3, 7, 7), g, False)
    _bn(sd, "backbone.conv1.bn", stages[0], g)
    inplanes = stages[0]
    for i, planes in enumerate(stages):
        kt = 3 if INFLATED[i] else 1
        for b in range(2):
            p = f"backbone.layer{i + 1}.{b}"
            cin = inplanes if b == 0 else planes
            _conv(sd, f"{p}.conv1.conv", (planes, cin, kt, 3, 3), g, False)
            _bn(sd, f"{p}.conv1.bn", planes, g)
            _conv(sd, f"{p}.conv2.conv", (planes, planes, kt, 3, 3), g, False)
            _bn(sd, f"{p}.conv2.bn", planes, g)
            if b == 0:  # spatial_stride 2 in every stage -> projection shortcut
                _conv(sd, f"{p}.downsample.conv", (planes, inplanes, 1, 1, 1), g, False)
                _bn(sd, f"{p}.downsample.bn", planes, g)
        inplanes = planes
    heads = [("neck", stages[:3]), ("read_out_head", stages[3:])]
    if semantic:
        heads.append(("semantic_head", stages[:3]))
    for name, ins in heads:
        for j, c in enumerate(ins):
            _conv(sd, f"{name}.lateral_convs.{j}.conv", (out, c, 1, 1, 1), g, True)
        _conv(sd, f"{name}.fpn_convs.0.conv", (out, out, 3, 3, 3), g, True)
    return sd


def reference_forward(sd, x):
    """The reference extract_feat(), functionally: returns [fine, coarse(, semantic)]."""
    def conv_bn(p, x, stride, padding, relu):
        x = F.conv3d(x, sd[f"{p}.conv.weight"], None, stride, padding)
        x = F.batch_norm(x, sd[f"{p}.bn.running_mean"], sd[f"{p}.bn.running_var"], sd[f"{p}.bn.weight"],
                         sd[f"{p}.bn.bias"], False, 0.0, 1e-5)
        return F.relu(x) if relu else x

    x = conv_bn("backbone.conv1", x, 1, (1, 3, 3), True)  # conv1_kernel (3,7,7), stride 1, no pool1
    feats = []
    for i in range(4):
        pad = (1, 1, 1) if INFLATED[i] else (0, 1, 1)
        for b in range(2):
            p = f"backbone.layer{i + 1}.{b}"
            stride = (Z_STRIDES[i], 2, 2) if b == 0 else (1, 1, 1)
            out = conv_bn(f"{p}.conv2", conv_bn(f"{p}.conv1", x, stride, pad, True), 1, pad, False)
            identity = conv_bn(f"{p}.downsample", x, stride, 0, False) if b == 0 else x
            x = F.relu(out + identity)
        if i == 0:
            x = F.max_pool3d(x, (2, 1, 1), (2, 1, 1))  # pool2
        feats.append(x)

    def fpn(name, ins):
        lat = [F.conv3d(f, sd[f"{name}.lateral_convs.{j}.conv.weight"], sd[f"{name}.lateral_convs.{j}.conv.bias"])
               for j, f in enumerate(ins)]
        for j in range(len(lat) - 1, 0, -1):
            lat[j - 1] = lat[j - 1] + F.interpolate(lat[j], size=lat[j - 1].shape[2:], mode="nearest")
        y = F.conv3d(lat[0], sd[f"{name}.fpn_convs.0.conv.weight"], sd[f"{name}.fpn_convs.0.conv.bias"], padding=1)
        return F.normalize(y, dim=1)

    outs = [fpn("neck", feats[:3]), fpn("read_out_head", feats[3:])]
    if "semantic_head.fpn_convs.0.conv.weight" in sd:
        outs.append(fpn("semantic_head", feats[:3]))
    return outs


def save_official(path: Path, sd, config_text="model = dict(type='Sam_uniform_cross_volume_dual_head_mean_vector')",
                  extra=None) -> Path:
    """torch.save in the mmcv checkpoint layout: meta + state_dict (+ optimizer)."""
    ckpt = {"meta": {"mmcv_version": "1.4.7", "config": config_text, "iter": 20000, "epoch": 1},
            "state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "momentum": 0.9}]}}
    ckpt.update(extra or {})
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def small_official(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    return save_official(d / "SAMv2_small.pth", reference_state_dict(SMALL, out=16, seed=1))


@pytest.fixture(scope="module")
def saved_lite(tmp_path_factory):
    torch.manual_seed(3)
    model = build_network(NetConfig.lite())
    # Non-trivial BatchNorm statistics so that the BN buffers matter in the round trip.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    d = tmp_path_factory.mktemp("lite")
    card = ModelCard(name="test-lite", architecture={}, heads=[], modality="CT",
                     training={"data": "none", "iterations": 0}, notes="unit test")
    p32 = save_model(model, card, d / "lite32.safetensors")
    p16 = save_model(model, card, d / "lite16.safetensors", fp16=True)
    return model, p32, p16


def _outputs(model, x):
    with torch.inference_mode():
        return model(x)


X = torch.randn(1, 1, 8, 32, 32, generator=torch.Generator().manual_seed(5)) * 60


# ------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------

def test_round_trip_fp32_and_fp16(saved_lite):
    model, p32, p16 = saved_lite
    ref = _outputs(model, X)
    lm32, lm16 = load_model(p32), load_model(p16)
    assert not lm32.model.training and lm32.card.name == "test-lite"
    assert lm32.card.config == NetConfig.lite() and lm32.card.heads == ["fine", "coarse", "semantic"]
    assert lm32.card.sha256 == sha256_of(p32) and lm16.card.storage_dtype == "float16"
    assert lm32.card.training == {"data": "none", "iterations": 0}
    out32, out16 = _outputs(lm32.model, X), _outputs(lm16.model, X)
    for k in ref:
        assert torch.equal(out32[k], ref[k]), k
        # fp16 weights: embeddings stay within a small cosine distance of the fp32 ones.
        cos = (out16[k] * ref[k]).sum(1)
        assert float(cos.min()) > 0.999, k
    assert p16.stat().st_size < 0.6 * p32.stat().st_size
    assert card_path_for(p32).is_file() and not list(p32.parent.glob("*.tmp"))


def test_save_rejects_bad_arguments(tmp_path, saved_lite):
    model = saved_lite[0]
    card = ModelCard(name="x", architecture={}, heads=[])
    with pytest.raises(InputError):
        save_model(model, card, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="modality"):
        save_model(model, ModelCard(name="x", architecture={}, heads=[], modality="PET"), tmp_path / "w.safetensors")


def _copy_pair(src: Path, dst_dir: Path, name="m") -> Path:
    dst = dst_dir / f"{name}.safetensors"
    dst.write_bytes(src.read_bytes())
    card_path_for(dst).write_text(card_path_for(src).read_text())
    return dst


def _rewrite_card(path: Path, **changes):
    cp = card_path_for(path)
    d = json.loads(cp.read_text())
    d.update(changes)
    cp.write_text(json.dumps(d))


def test_load_failures_raise_checkpoint_error(tmp_path, saved_lite):
    from safetensors.torch import load_file, save_file

    _, p32, _ = saved_lite
    with pytest.raises(CheckpointError, match="model file not found"):
        load_model(tmp_path / "nope.safetensors")

    p = _copy_pair(p32, tmp_path, "nocard")
    card_path_for(p).unlink()
    with pytest.raises(CheckpointError, match="model card not found"):
        load_model(p)

    p = _copy_pair(p32, tmp_path, "badjson")
    card_path_for(p).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(p)

    p = _copy_pair(p32, tmp_path, "unknownkey")
    _rewrite_card(p, colour="blue")
    with pytest.raises(CheckpointError, match="unknown model card keys: colour"):
        load_model(p)

    p = _copy_pair(p32, tmp_path, "flipped")
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_model(p)

    p = _copy_pair(p32, tmp_path, "garbage")
    p.write_bytes(b"\x80\x04garbage, not a safetensors file" * 10)
    _rewrite_card(p, sha256=sha256_of(p))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(p)

    # The card claims another architecture than the weights hold.
    p = _copy_pair(p32, tmp_path, "wrongarch")
    _rewrite_card(p, architecture=NetConfig.full().to_dict())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(p)
    _rewrite_card(p, architecture=NetConfig.lite(semantic_head=False).to_dict(), heads=["fine", "coarse"],
                  matching_heads=["fine", "coarse"])
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_model(p)

    state = load_file(str(p32))
    for name, edit in [("missing", lambda s: s.pop("neck.fpn_convs.0.conv.bias")),
                       ("extra", lambda s: s.__setitem__("neck.extra.weight", torch.zeros(1))),
                       ("reshaped", lambda s: s.__setitem__("backbone.conv1.conv.weight", torch.zeros(16, 1, 1, 7, 7)))]:
        p = _copy_pair(p32, tmp_path, name)
        s = dict(state)
        edit(s)
        save_file(s, str(p))
        _rewrite_card(p, sha256=sha256_of(p))
        expected = {"missing": "missing key.*neck.fpn_convs.0.conv.bias", "extra": "unexpected key.*neck.extra.weight",
                    "reshaped": r"shape mismatch.*backbone.conv1.conv.weight \(16, 1, 1, 7, 7\)"}[name]
        with pytest.raises(CheckpointError, match=expected):
            load_model(p)


def test_error_messages_are_one_line(tmp_path, saved_lite):
    p = _copy_pair(saved_lite[1], tmp_path)
    _rewrite_card(p, sha256="0" * 64)
    with pytest.raises(CheckpointError) as info:
        load_model(p)
    assert "\n" not in str(info.value)


def test_bundled_model(tmp_path):
    try:
        path = bundled_model_path()
    except CheckpointError as exc:
        assert "bundled model not found" in str(exc)
        with pytest.raises(CheckpointError):
            default_model()
        return
    lm = default_model()
    assert lm.path == path and lm.card.config.variant == "lite"


# ------------------------------------------------------------------------------------------
# official checkpoint conversion
# ------------------------------------------------------------------------------------------

def test_convert_full_samv2_matches_reference_forward(tmp_path):
    sd = reference_state_dict(seed=0)
    src = save_official(tmp_path / "SAMv2_iter_20000.pth", sd)
    card = convert_official_checkpoint(src, tmp_path / "samv2.safetensors")
    assert card.config == NetConfig.full() and card.modality == "CT"
    assert card.heads == ["fine", "coarse", "semantic"] and card.matching_heads == card.heads
    assert card.training["source_file"] == "SAMv2_iter_20000.pth" and card.training["iterations"] == 20000
    lm = load_model(tmp_path / "samv2.safetensors")
    x = torch.randn(1, 1, 8, 32, 48, generator=torch.Generator().manual_seed(1)) * 60
    out = _outputs(lm.model, x)
    with torch.inference_mode():
        ref = reference_forward(sd, x)
    for k, r in zip(["fine", "coarse", "semantic"], ref):
        assert out[k].shape == r.shape, k
        assert torch.allclose(out[k], r, atol=2e-4), (k, float((out[k] - r).abs().max()))
    # Same as loading the dict straight into a directly built network.
    direct = build_network(NetConfig.full()).eval()
    direct.load_state_dict(sd)
    assert all(torch.allclose(v, out[k], atol=1e-5) for k, v in _outputs(direct, x).items())


def test_convert_detects_sam_and_crosssam(tmp_path):
    sam = save_official(tmp_path / "SAM.pth", reference_state_dict(SMALL, out=16, semantic=False),
                        config_text="model = dict(type='Sam')")
    card = convert_official_checkpoint(sam, tmp_path / "sam.safetensors")
    assert card.heads == ["fine", "coarse"] and card.modality == "CT" and card.name.startswith("SAM ")
    assert set(_outputs(load_model(tmp_path / "sam.safetensors").model, X)) == {"fine", "coarse"}

    sd = reference_state_dict(SMALL, out=16)
    by_name = save_official(tmp_path / "CrossSAM_iter_20000_ct_mr_inter_1.pth", sd, config_text="")
    card = convert_official_checkpoint(by_name, tmp_path / "cross.safetensors")
    assert card.modality == "CT+MR" and card.name.startswith("CrossSAM")
    assert card.matching_heads == ["fine", "coarse"] and "semantic" in card.heads

    by_meta = save_official(tmp_path / "iter_20000.pth", sd,
                            config_text="model = dict(type='Sam_uniform_cross_volume_dual_head_mri_ct')")
    assert convert_official_checkpoint(by_meta, tmp_path / "cross2.safetensors").modality == "CT+MR"

    # Explicit variants: SAM drops the semantic head; SAMv2 on a SAM file is refused.
    card = convert_official_checkpoint(by_meta, tmp_path / "forced.safetensors", variant="SAM")
    assert card.heads == ["fine", "coarse"]
    with pytest.raises(CheckpointError, match="semantic head"):
        convert_official_checkpoint(sam, tmp_path / "bad.safetensors", variant="SAMv2")
    with pytest.raises(InputError):
        convert_official_checkpoint(sam, tmp_path / "bad.safetensors", variant="SAMv3")


def test_convert_handles_module_prefix_extras_and_numpy_meta(tmp_path):
    sd = reference_state_dict(SMALL, out=16, seed=2)
    wrapped = OrderedDict((f"module.{k}", v) for k, v in sd.items())
    wrapped["module.supcriterion.dummy"] = torch.zeros(3)  # not part of the embedding network
    src = save_official(tmp_path / "SAMv2_wrapped.pth", wrapped,
                        extra={"meta": {"iter": np.int64(7), "lr": np.float64(0.02)}})
    card = convert_official_checkpoint(src, tmp_path / "w.safetensors", fp16=True)
    assert card.storage_dtype == "float16" and "dropped 1" in card.notes
    out = _outputs(load_model(tmp_path / "w.safetensors").model, X)
    with torch.inference_mode():
        ref = reference_forward(sd, X)
    assert float((out["fine"] * ref[0]).sum(1).min()) > 0.999


class Exploit:
    """Unpickling this would create a marker file: the converter must never do it."""
    marker: Path = Path("/nonexistent")

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_convert_failures(tmp_path, small_official):
    sd = reference_state_dict(SMALL, out=16, seed=1)
    dst = tmp_path / "out.safetensors"

    with pytest.raises(CheckpointError, match="checkpoint not found"):
        convert_official_checkpoint(tmp_path / "missing.pth", dst)

    bad = dict(sd)
    bad["backbone.layer3.1.conv2.conv.weight"] = torch.zeros(64, 64, 1, 3, 3)  # 2D kernel where 3D expected
    with pytest.raises(CheckpointError, match=r"shape mismatch.*backbone.layer3.1.conv2.conv.weight"):
        convert_official_checkpoint(save_official(tmp_path / "shape.pth", bad), dst)

    bad = dict(sd)
    del bad["read_out_head.fpn_convs.0.conv.bias"]
    with pytest.raises(CheckpointError, match=r"missing key.*read_out_head.fpn_convs.0.conv.bias"):
        convert_official_checkpoint(save_official(tmp_path / "missing_key.pth", bad), dst)

    bad = dict(sd)
    bad["backbone.layer5.0.conv1.conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected key.*backbone.layer5"):
        convert_official_checkpoint(save_official(tmp_path / "extra_key.pth", bad), dst)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        convert_official_checkpoint(garbage, dst)

    Exploit.marker = tmp_path / "PWNED"
    evil = save_official(tmp_path / "evil.pth", sd, extra={"payload": Exploit()})
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        convert_official_checkpoint(evil, dst)
    assert not Exploit.marker.exists()

    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no backbone/neck weights"):
        convert_official_checkpoint(tmp_path / "other.pth", dst)
    assert not dst.exists()

    # The module-scoped small file converts fine (sanity for the fixture used above).
    card = convert_official_checkpoint(small_official, dst)
    assert card.config.stage_channels == SMALL and card.config.variant == "custom"
    assert read_card(dst) == card
