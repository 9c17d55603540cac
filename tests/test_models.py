"""Tests of the U-Net and the (timestep-dependent) self-attention blocks, pdcbdm/models/."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from pdcbdm.models import (
    NETWORKS,
    SelfAttention,
    TimestepSelfAttention,
    UNet,
    UNetSpec,
    build_unet,
    parse_resolutions,
)

K_SMALL = 10


def _inputs(batch: int, spec: UNetSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, K_SMALL, (batch,), generator=gen)
    return x, t, y


def _small(tsa: str = "", seed: int = 0, **overrides: object) -> UNet:
    torch.manual_seed(seed)
    return build_unet("small", K_SMALL, tsa_resolutions=tsa, **overrides).eval()


def _randomise_(module: nn.Module, seed: int, std: float = 0.1) -> None:
    """Overwrite every parameter with noise, so near-zero DDPM inits cannot hide a difference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _tsa_blocks(net: nn.Module) -> list[TimestepSelfAttention]:
    return [m for m in net.modules() if isinstance(m, TimestepSelfAttention)]


# ---------------------------------------------------------------- parse_resolutions


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("16,8,4", (16, 8, 4)), ("", ()), ("  ", ()), (" 16 , 8 ", (16, 8)), ("16", (16,)), ([8, 16], (8, 16)), ((), ())],
)
def test_parse_resolutions(spec: object, expected: tuple[int, ...]) -> None:
    assert parse_resolutions(spec) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["16,a", "1.5", "16,,8", "-4", "0", [16.0], [True], 16])
def test_parse_resolutions_rejects_non_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="resolution"):
        parse_resolutions(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("tsa", ["", "16", "8", "16,8,4"])
def test_small_output_shape_and_tsa_placement(tsa: str) -> None:
    net = _small(tsa)
    spec = net.spec
    x, t, y = _inputs(3, spec)
    with torch.no_grad():
        out = net(x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    levels = parse_resolutions(tsa)
    assert net.tsa_resolutions == tuple(sorted(levels, reverse=True))
    # Per level: num_res_blocks positions down, num_res_blocks + 1 up; plus the middle block at the lowest level.
    per_level = 2 * spec.num_res_blocks + 1
    expected = per_level * len(levels) + (spec.resolutions[-1] in levels)
    assert len(_tsa_blocks(net)) == expected


def test_small_preset_size_and_levels() -> None:
    net = build_unet("small", K_SMALL)
    assert net.spec.resolutions == (16, 8, 4)
    assert (net.spec.image_size, net.spec.in_channels, net.spec.ch) == (16, 1, 32)
    n = net.count_parameters()
    print(f"small preset parameters (K={K_SMALL}): {n:,}")
    assert 200_000 <= n <= 2_000_000
    attn = [m for m in net.modules() if type(m) is SelfAttention]
    assert len(attn) == 2 * net.spec.num_res_blocks + 1 + 1  # level 8 positions + middle


def test_cifar_parameter_count_and_forward() -> None:
    torch.manual_seed(0)
    net = build_unet("cifar", 100).eval()
    n = net.count_parameters()
    print(f"cifar preset parameters (K=100): {n:,} ({n / 35.9e6 - 1:+.2%} vs 35.9M)")
    assert abs(n / 35.9e6 - 1) < 0.03
    assert net.spec.resolutions == (32, 16, 8, 4)
    assert net.num_classes == 100 and net.null_label == 100
    tsa_net = build_unet("cifar", 100, tsa_resolutions="16").eval()
    assert len(_tsa_blocks(tsa_net)) == 5  # 2 down + 3 up at 16, middle (at 4) stays plain
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = tsa_net(x, torch.tensor([500]), torch.tensor([3]))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_overrides_change_the_net() -> None:
    net = build_unet("small", 4, image_size=8, in_channels=3, ch=16, ch_mult=[1, 2], tsa_resolutions="4")
    assert net.spec.resolutions == (8, 4) and net.spec.ch_mult == (1, 2)
    x = torch.randn(2, 3, 8, 8)
    assert net(x, torch.tensor([0, 999]), torch.tensor([0, 4])).shape == x.shape
    assert len(_tsa_blocks(net)) == 2 * net.spec.num_res_blocks + 1 + 1  # level 4 and the middle block
    assert NETWORKS["small"].ch == 32  # the named networks are not mutated by overrides


# ---------------------------------------------------------------- TSA == plain attention when W^t = 0


def test_fresh_tsa_block_equals_plain_block_bit_for_bit() -> None:
    torch.manual_seed(0)
    plain = SelfAttention(64, num_heads=4)
    _randomise_(plain, seed=1)
    tsa = TimestepSelfAttention(64, temb_dim=32, num_heads=4)
    missing, unexpected = tsa.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["time_k.weight", "time_q.weight", "time_v.weight"] and not unexpected
    x, temb = torch.randn(3, 64, 8, 8), torch.randn(3, 32)
    out_plain, out_tsa = plain(x), tsa(x, temb)
    assert torch.equal(out_plain, out_tsa)
    assert not torch.allclose(out_plain, x, atol=1e-3)  # the attention branch is really active


def test_fresh_tsa_unet_equals_plain_unet_bit_for_bit() -> None:
    plain = _small("", seed=0)
    tsa = _small("8", seed=1)
    _randomise_(plain, seed=2, std=0.05)
    missing, unexpected = tsa.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.rsplit(".", 2)[-2].startswith("time_") for k in missing)
    x, t, y = _inputs(4, plain.spec)
    with torch.no_grad():
        assert torch.equal(plain(x, t, y), tsa(x, t, y))


def test_nonzero_time_projections_make_attention_depend_on_t() -> None:
    torch.manual_seed(0)
    plain = SelfAttention(32, num_heads=2)
    _randomise_(plain, seed=3)
    tsa = TimestepSelfAttention(32, temb_dim=16, num_heads=2)
    tsa.load_state_dict(plain.state_dict(), strict=False)
    _randomise_(nn.ModuleList([tsa.time_q, tsa.time_k, tsa.time_v]), seed=4, std=0.5)
    x = torch.randn(2, 32, 4, 4)
    e1, e2 = torch.randn(2, 16), torch.randn(2, 16)
    out1, out2 = tsa(x, e1), tsa(x, e2)
    assert not torch.allclose(out1, plain(x), atol=1e-4)
    assert not torch.allclose(out1, out2, atol=1e-4)
    # Only the value offset enters when there is one position: there, attention returns V itself.
    x1 = torch.randn(2, 32, 1, 1)
    assert not torch.allclose(tsa(x1, e1), tsa(x1, e2), atol=1e-4)


def test_tsa_unet_output_depends_on_t_through_tsa() -> None:
    plain = _small("", seed=0)
    _randomise_(plain, seed=5, std=0.05)
    tsa = _small("16,8,4", seed=0)
    tsa.load_state_dict(plain.state_dict(), strict=False)
    for block in _tsa_blocks(tsa):
        _randomise_(nn.ModuleList([block.time_q, block.time_k, block.time_v]), seed=6, std=0.05)
    x, t, y = _inputs(2, plain.spec)
    with torch.no_grad():
        diff_tsa = (tsa(x, t, y) - tsa(x, 999 - t, y)).abs().mean()
        diff_plain = (plain(x, t, y) - plain(x, 999 - t, y)).abs().mean()
        assert not torch.allclose(tsa(x, t, y), plain(x, t, y), atol=1e-5)
    assert diff_tsa != diff_plain  # the t-dependence changed, not only the output


def test_gradient_reaches_tsa_time_projections() -> None:
    net = _small("8").train()
    x, t, y = _inputs(4, net.spec)
    net(x, t, y).square().mean().backward()
    for block in _tsa_blocks(net):
        for proj in (block.time_q, block.time_k, block.time_v):
            assert proj.weight.grad is not None
            assert torch.isfinite(proj.weight.grad).all()
            assert proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- conditioning


def test_null_label_and_none() -> None:
    net = _small()
    _randomise_(net, seed=7, std=0.05)
    with torch.no_grad():
        net.class_embed.weight[net.null_label].zero_()  # what padding_idx keeps it at
    x, t, y = _inputs(3, net.spec)
    null = torch.full_like(y, net.null_label)
    with torch.no_grad():
        out_none, out_null, out_y = net(x, t, None), net(x, t, null), net(x, t, y)
    assert torch.equal(out_none, out_null)
    assert not torch.allclose(out_null, out_y, atol=1e-4)


def test_null_row_is_zero_and_untrained() -> None:
    net = _small().train()
    assert torch.count_nonzero(net.class_embed.weight[net.null_label]) == 0
    x, t, _ = _inputs(3, net.spec)
    y = torch.tensor([0, net.null_label, 2])
    net(x, t, y).square().mean().backward()
    grad = net.class_embed.weight.grad
    assert grad is not None and torch.count_nonzero(grad[net.null_label]) == 0
    assert torch.count_nonzero(grad[0]) > 0


# ---------------------------------------------------------------- errors


def test_bad_preset_names_it_and_lists_valid() -> None:
    with pytest.raises(ValueError, match=r"'huge'.*cifar.*small"):
        build_unet("huge", 10)


def test_bad_tsa_resolution_names_it_and_lists_levels() -> None:
    with pytest.raises(ValueError, match=r"tsa_resolutions: 32 .*\[16, 8, 4\]"):
        build_unet("small", 10, tsa_resolutions="16,32")


def test_bad_attn_resolution_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"attn_resolutions: 2 .*\[16, 8, 4\]"):
        build_unet("small", 10, attn_resolutions="2")


def test_bad_override_names_it_and_lists_valid() -> None:
    with pytest.raises(ValueError, match=r"'channels'.*ch_mult"):
        build_unet("small", 10, channels=64)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"ch": 0}, "ch"),
        ({"dropout": 1.5}, "dropout"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"image_size": 18}, "image_size"),
    ],
)
def test_bad_spec_values_name_the_field(override: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_unet("small", 10, **override)


def test_heads_must_divide_channels() -> None:
    with pytest.raises(ValueError, match="num_heads=3"):
        build_unet("small", 10, num_heads=3)


def test_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_unet("small", 0)


def test_bad_inputs_are_rejected() -> None:
    net = _small()
    x, t, y = _inputs(2, net.spec)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 3, 16, 16), t, y)
    with pytest.raises(ValueError, match="t must have shape"):
        net(x, t[:1], y)
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 10\]"):
        net(x, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        net(x, t, y.float())


# ---------------------------------------------------------------- precision, persistence


def test_bf16_autocast_forward_and_backward() -> None:
    net = _small("16").train()
    x, t, y = _inputs(4, net.spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


def test_state_dict_round_trip() -> None:
    net = _small("8", seed=3)
    _randomise_(net, seed=8, std=0.05)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    other = _small("8", seed=4)
    other.load_state_dict(torch.load(buf, weights_only=True))
    x, t, y = _inputs(2, net.spec)
    with torch.no_grad():
        assert torch.equal(net(x, t, y), other(x, t, y))


def test_tsa_receives_time_embedding_without_class_embedding() -> None:
    net = _small("8")
    _randomise_(net, seed=9, std=0.05)
    x, t, y = _inputs(3, net.spec)
    seen: list[torch.Tensor] = []
    block = _tsa_blocks(net)[0]
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[1].detach()))
    with torch.no_grad():
        net(x, t, y)
        expected = net.time_embed(t)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def test_forward_is_device_agnostic_on_meta() -> None:
    # A stand-in for CUDA here: any tensor made on the host, or a host sync, fails on the meta device.
    with torch.device("meta"):
        net = build_unet("small", K_SMALL, tsa_resolutions="16,8,4")
        x, t = torch.empty(2, 1, 16, 16), torch.zeros(2, dtype=torch.long)
        y = torch.zeros(2, dtype=torch.long)
    assert net(x, t, y).shape == (2, 1, 16, 16)
    assert net(x, t, None).device.type == "meta"
