"""nova3d.models.temporal_conv: the faster temporal convolution is the same function with the same weights."""
import torch

from nova3d.models.svd_configs import tiny_unet_config
from nova3d.models.temporal_conv import FastTemporalConv3d, use_fast_temporal_convs


def test_fast_temporal_conv_matches_conv3d_forward_and_backward():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 5, (3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(2, 6, 7, 4, 3, requires_grad=True)
    ref = conv(x)
    (gx_ref, gw_ref) = torch.autograd.grad(ref.square().sum(), (x, conv.weight))
    assert use_fast_temporal_convs(conv) == 1 and isinstance(conv, FastTemporalConv3d)
    out = conv(x)
    (gx, gw) = torch.autograd.grad(out.square().sum(), (x, conv.weight))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-4)


def test_only_temporal_kernels_switch_and_state_dicts_are_unchanged():
    from diffusers import UNetSpatioTemporalConditionModel

    spatial = torch.nn.Conv3d(2, 2, 3, padding=1)  # a real 3-D kernel keeps its class
    assert use_fast_temporal_convs(spatial) == 0 and type(spatial) is torch.nn.Conv3d
    unet = UNetSpatioTemporalConditionModel.from_config(tiny_unet_config())
    keys = list(unet.state_dict())
    x = torch.randn(1, 4, 8, 8, 8)
    args = dict(encoder_hidden_states=torch.randn(1, 1, 32), added_time_ids=torch.randn(1, 3), return_dict=False)
    ref = unet(x, torch.tensor([0.5]), **args)[0]
    assert use_fast_temporal_convs(unet) > 0
    assert list(unet.state_dict()) == keys
    torch.testing.assert_close(unet(x, torch.tensor([0.5]), **args)[0], ref, rtol=1e-4, atol=1e-4)
