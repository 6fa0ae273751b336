"""Tests for samv2core.network: shapes, strides, normalisation, configs, input checks."""
from __future__ import annotations

import pytest
import torch

from samv2core.errors import CheckpointError, InputError
from samv2core.network import NetConfig, SAMv2Net, build_network, count_parameters



@pytest.fixture(scope="module")
def lite(lite_net):
    return lite_net  # the shared deterministic lite network (conftest); these tests only read it


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return build_network(NetConfig.full()).eval()


@pytest.mark.parametrize("which", ["lite", "full"])
def test_output_shapes_strides_and_unit_norm(which, request):
    model: SAMv2Net = request.getfixturevalue(which)
    z, y, x = 8, 32, 48
    inp = torch.randn(2, 1, z, y, x) * 50
    with torch.inference_mode():
        out = model(inp)
    assert set(out) == {"fine", "coarse", "semantic"}
    e = model.config.embed_dim
    fz, fy, fx = SAMv2Net.fine_stride
    cz, cy, cx = SAMv2Net.coarse_stride
    assert out["fine"].shape == (2, e, z // fz, y // fy, x // fx)
    assert out["semantic"].shape == (2, e, z // fz, y // fy, x // fx)
    assert out["coarse"].shape == (2, e, z // cz, y // cy, x // cx)
    for v in out.values():
        assert v.dtype == torch.float32
        assert torch.allclose(v.norm(dim=1), torch.ones(()), atol=1e-4)
    # The heads are different functions of the input, not copies of each other.
    assert not torch.allclose(out["fine"], out["semantic"])
    # Batch items are independent in eval mode.
    with torch.inference_mode():
        single = model(inp[1:])
    assert torch.allclose(single["fine"][0], out["fine"][1], atol=1e-5)


def test_parameter_counts(lite, full):
    # The reference SAMv2 network has about 33M parameters (layer4 alone ~25M).
    assert 32_000_000 < count_parameters(full) < 34_500_000
    assert count_parameters(lite) < count_parameters(full) / 8
    no_sem = build_network(NetConfig.full(semantic_head=False))
    sem_params = sum(p.numel() for p in full.semantic_head.parameters())
    assert count_parameters(no_sem) == count_parameters(full) - sem_params


def test_without_semantic_head_has_two_outputs():
    model = build_network(NetConfig.lite(semantic_head=False)).eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 1, 4, 16, 16))
    assert set(out) == {"fine", "coarse"} and model.heads == ("fine", "coarse")
    assert not hasattr(model, "semantic_head")


@pytest.mark.parametrize("shape", [(1, 1, 18, 32, 32), (1, 1, 16, 40, 32), (1, 1, 16, 32, 24), (1, 2, 16, 32, 32),
                                   (1, 16, 32, 32), (1, 1, 0, 32, 32)])
def test_bad_input_shape_raises_input_error_naming_shape(lite, shape):
    with pytest.raises(InputError) as info:
        lite(torch.zeros(shape))
    assert str(tuple(shape)) in str(info.value)


def test_module_names_follow_the_mmcv_layout(full):
    keys = set(full.state_dict())
    for k in ["backbone.conv1.conv.weight", "backbone.conv1.bn.running_var", "backbone.layer1.0.conv1.conv.weight",
              "backbone.layer1.0.downsample.conv.weight", "backbone.layer4.1.conv2.bn.bias",
              "neck.lateral_convs.2.conv.bias", "neck.fpn_convs.0.conv.weight",
              "read_out_head.lateral_convs.0.conv.weight", "semantic_head.fpn_convs.0.conv.bias"]:
        assert k in keys, k
    sd = full.state_dict()
    assert sd["backbone.conv1.conv.weight"].shape == (64, 1, 3, 7, 7)
    assert sd["backbone.layer2.0.conv1.conv.weight"].shape == (128, 64, 1, 3, 3)   # not inflated
    assert sd["backbone.layer3.0.conv1.conv.weight"].shape == (256, 128, 3, 3, 3)  # inflated
    assert sd["read_out_head.lateral_convs.0.conv.weight"].shape == (128, 512, 1, 1, 1)
    assert sd["neck.fpn_convs.0.conv.weight"].shape == (128, 128, 3, 3, 3)


def test_train_mode_backpropagates(lite):
    model = build_network(NetConfig.lite()).train()
    out = model(torch.randn(2, 1, 8, 32, 32))
    loss = sum(v.sum() for v in out.values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_netconfig_dict_round_trip_and_validation():
    for cfg in (NetConfig.full(), NetConfig.lite(semantic_head=False)):
        d = cfg.to_dict()
        assert isinstance(d["stage_channels"], list)
        assert NetConfig.from_dict(d) == cfg
    with pytest.raises(CheckpointError, match="unknown architecture keys: depth"):
        NetConfig.from_dict({**NetConfig.lite().to_dict(), "depth": 18})
    with pytest.raises(InputError, match="missing architecture keys: embed_dim"):
        d = NetConfig.lite().to_dict()
        del d["embed_dim"]
        NetConfig.from_dict(d, error=InputError)
    with pytest.raises(CheckpointError):
        NetConfig.from_dict({**NetConfig.lite().to_dict(), "stage_channels": [1, 2, 3]})
    with pytest.raises(InputError):
        build_network({"variant": "lite"})
