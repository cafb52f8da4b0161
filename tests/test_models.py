"""The ResNet builder and the presets: torchvision equivalence, the attention blocks' structure,
parameter accounting derived from the architecture, and rejection of bad input."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from sasa_bench import PRESETS, LocalSelfAttention2d, SasaError, create_model, make_spec
from sasa_bench.models.resnet import torchvision_key

BLOCKS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # the paper's
WIDTHS = (64, 128, 256, 512)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------------------
# The baseline is torchvision's ResNet-50
# --------------------------------------------------------------------------------------------


def test_resnet50_is_torchvisions() -> None:
    ours = create_model("resnet50", image_size=64)
    tv = torchvision.models.resnet50()
    assert n_params(ours) == n_params(tv) == 25_557_032
    with torch.no_grad():  # non-trivial BN statistics, so a misplaced BN shows in the outputs
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    ours.load_state_dict({torchvision_key(k): v for k, v in tv.state_dict().items()}, strict=True)
    ours.eval()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Attention blocks
# --------------------------------------------------------------------------------------------


def test_attention_replaces_every_3x3_conv_and_downsamples_after_it() -> None:
    model = create_model("sasa_resnet26_convstem", image_size=64, num_classes=10)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    for g, n_blocks in enumerate(BLOCKS[26], start=1):
        group = getattr(model, f"layer{g}")
        assert len(group) == n_blocks
        for i, block in enumerate(group):
            if g > 1 and i == 0:  # the downsampling block: attention, then a 2x2/2 average pool
                assert isinstance(block.conv2, nn.Sequential) and len(block.conv2) == 2
                attn, pool = block.conv2
                assert isinstance(attn, LocalSelfAttention2d)
                assert isinstance(pool, nn.AvgPool2d)
                assert pool.kernel_size == 2 and pool.stride == 2
                assert block.downsample[0].stride == (2, 2)
            else:
                assert isinstance(block.conv2, LocalSelfAttention2d)
            attn = block.conv2[0] if isinstance(block.conv2, nn.Sequential) else block.conv2
            assert (attn.kernel_size, attn.heads) == (7, 8)
            assert attn.in_channels == attn.out_channels == WIDTHS[g - 1]


def test_attention_runs_at_the_pre_downsampling_resolution() -> None:
    model = create_model("sasa_resnet26_convstem", image_size=64, num_classes=10).eval()
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0].shape, out.shape)))
        for name, m in model.named_modules()
        if isinstance(m, LocalSelfAttention2d)
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    # 64 -> stem /4 = 16; groups 2, 3, 4 halve after their first attention layer
    assert seen["layer1.0.conv2"] == ((1, 64, 16, 16), (1, 64, 16, 16))
    assert seen["layer2.0.conv2.0"] == ((1, 128, 16, 16), (1, 128, 16, 16))
    assert seen["layer2.1.conv2"][0][-2:] == (8, 8)
    assert seen["layer3.0.conv2.0"][0][-2:] == (8, 8)
    assert seen["layer4.0.conv2.0"][0][-2:] == (4, 4)


def _bottleneck_3x3_widths(depth: int, groups: tuple[int, ...] = (1, 2, 3, 4), width: float = 1.0) -> list[int]:
    """The width of every block whose 3x3 conv becomes attention."""
    return [
        max(1, round(WIDTHS[g - 1] * width))
        for g in groups
        for _ in range(BLOCKS[depth][g - 1])
    ]


@pytest.mark.parametrize("depth", [26, 50])
def test_params_follow_from_the_architecture(depth: int) -> None:
    """An attention layer has 3 w^2 projection weights (2 w^2 without W_K) plus k*D relative
    embeddings (D = w / heads) instead of the 3x3 conv's 9 w^2."""
    base = n_params(create_model(f"resnet{depth}"))
    widths = _bottleneck_3x3_widths(depth)
    for k, heads, logits in [(7, 8, "qk+qr"), (3, 4, "qk+qr"), (5, 8, "qr")]:
        proj = 3 if logits == "qk+qr" else 2
        expected = base + sum(-9 * w * w + proj * w * w + k * (w // heads) for w in widths)
        model = create_model(f"sasa_resnet{depth}_convstem", kernel_size=k, heads=heads, logits=logits)
        assert n_params(model) == expected, (k, heads, logits)


def test_params_depend_on_k_only_through_the_relative_embeddings() -> None:
    widths = _bottleneck_3x3_widths(26, (2, 3, 4))
    p = {k: n_params(create_model("sasa_resnet26", kernel_size=k, attention_groups="2,3,4")) for k in (1, 3, 7, 11)}
    for k in (1, 3, 11):
        assert p[k] - p[7] == (k - 7) * sum(w // 8 for w in widths)
    q = {k: n_params(create_model("sasa_resnet26", kernel_size=k, pos="none")) for k in (3, 7)}
    assert q[3] == q[7]  # no relative embeddings, no dependence on k


def test_attention_groups_select_the_groups() -> None:
    model = create_model("sasa_resnet26_convstem", attention_groups="3,4", image_size=64)
    for g in (1, 2, 3, 4):
        group = getattr(model, f"layer{g}")
        has_attn = any(isinstance(m, LocalSelfAttention2d) for m in group.modules())
        has_conv3 = any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in group.modules())
        assert has_attn == (g in (3, 4)) and has_conv3 == (g in (1, 2))
    base = n_params(create_model("resnet26"))
    expected = base + sum(-6 * w * w + 7 * (w // 8) for w in _bottleneck_3x3_widths(26, (3, 4)))
    assert n_params(model) == expected


# --------------------------------------------------------------------------------------------
# Every preset builds and runs
# --------------------------------------------------------------------------------------------


CLASSIFIERS = sorted(n for n in PRESETS if PRESETS[n].detector == "none")


def test_there_are_twelve_classifiers_and_the_five_table2_detectors() -> None:
    expected = {
        f"{pre}{d}{suf}"
        for d in (26, 38, 50, 101)
        for pre, suf in (("resnet", ""), ("sasa_resnet", "_convstem"), ("sasa_resnet", ""))
    }
    assert set(CLASSIFIERS) == expected
    # the detectors (built and checked in test_detection.py)
    assert set(PRESETS) - expected == {
        "retinanet_resnet50", "retinanet_sasa_resnet50_convstem", "retinanet_sasa_resnet50",
        "retinanet_sasa_resnet50_convstem_attnfpn", "retinanet_sasa_resnet50_attnfpn",
    }
    for d in (26, 38, 50, 101):
        assert PRESETS[f"resnet{d}"].attention_groups == () and PRESETS[f"resnet{d}"].stem == "conv"
        assert PRESETS[f"sasa_resnet{d}_convstem"].attention_groups == (1, 2, 3, 4)
        assert PRESETS[f"sasa_resnet{d}_convstem"].stem == "conv"
        assert PRESETS[f"sasa_resnet{d}"].attention_groups == (1, 2, 3, 4)
        assert PRESETS[f"sasa_resnet{d}"].stem == "attention"
        for name in (f"resnet{d}", f"sasa_resnet{d}_convstem", f"sasa_resnet{d}"):
            assert PRESETS[name].blocks == BLOCKS[d]
            assert (PRESETS[name].kernel_size, PRESETS[name].heads) == (7, 8)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if "101" in n else n for n in CLASSIFIERS],
)
def test_every_preset_builds_and_runs(name: str) -> None:
    model = create_model(name, image_size=64, num_classes=5)
    depth = PRESETS[name].depth
    assert [len(getattr(model, f"layer{g}")) for g in (1, 2, 3, 4)] == list(BLOCKS[depth])
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 5)
    assert torch.isfinite(y).all()


def test_backward_through_a_full_attention_model() -> None:
    model = create_model("sasa_resnet26", image_size=32, num_classes=3, width=0.25, heads=2)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.layer4[0].conv2[0].query.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Width multiplier
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [0.25, 0.5, 2.0])
def test_width_multiplier(width: float) -> None:
    model = create_model("sasa_resnet26", width=width, image_size=64, num_classes=7)
    stem_w = round(64 * width)
    assert model.stem.query.out_channels == stem_w
    for g in (1, 2, 3, 4):
        attn = [m for m in getattr(model, f"layer{g}").modules() if isinstance(m, LocalSelfAttention2d)]
        assert attn and all(m.out_channels == round(WIDTHS[g - 1] * width) for m in attn)
    assert model.fc.in_features == 4 * round(512 * width)
    if width < 1:
        assert n_params(model) < n_params(create_model("sasa_resnet26"))
        model.eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_width_multiplier_baseline_params() -> None:
    """Half-width torchvision ResNet-26 params, counted by hand from the architecture."""
    w = [32, 64, 128, 256]
    stem = 7 * 7 * 3 * 32 + 2 * 32
    total, cin = stem, 32
    for g, n in enumerate(BLOCKS[26]):
        for i in range(n):
            cout = 4 * w[g]
            total += cin * w[g] + 2 * w[g] + 9 * w[g] ** 2 + 2 * w[g] + w[g] * cout + 2 * cout
            if i == 0:
                total += cin * cout + 2 * cout
            cin = cout
    total += cin * 10 + 10
    assert n_params(create_model("resnet26", width=0.5, num_classes=10)) == total


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kw"),
    [
        (None, {"kernel_size": 4}),
        (None, {"kernel_size": 0}),
        (None, {"kernel_size": -1}),
        (None, {"heads": 7}),  # does not divide 64
        ("sasa_resnet50", {"heads": 0}),
        ("sasa_resnet50", {"width": 0.1, "heads": 8}),  # widths 6, 13, 26, 51
        ("nope", {}),
        ("sasa_resnet50", {"stem": "foo"}),
        ("sasa_resnet50", {"stem_heads": 5}),
        ("sasa_resnet50", {"pos": "foo"}),
        ("sasa_resnet50", {"logits": "qk"}),
        ("sasa_resnet50", {"border": "reflect"}),
        ("sasa_resnet50", {"scale": "foo"}),
        ("sasa_resnet50", {"backend": "nope"}),
        (None, {"image_size": 100}),
        (None, {"image_size": 16}),
        (None, {"image_size": 0}),
        (None, {"attention_groups": "5"}),
        (None, {"attention_groups": "0,1"}),
        (None, {"attention_groups": "a,b"}),
        (None, {"attention_groups": [1, 5]}),
        (None, {"depth": 34}),
        (None, {"width": 0}),
        (None, {"num_classes": 0}),
        (None, {"no_such_option": 1}),
    ],
)
def test_bad_input_raises_sasa_error(model: str | None, kw: dict) -> None:
    with pytest.raises(SasaError):
        make_spec(model, **kw)
    with pytest.raises(SasaError):
        create_model(model, **kw)


def test_k_and_heads_are_validated_for_every_preset() -> None:
    # heads must divide every attention width, so k/heads are validated even for presets that
    # do not use them: the same flags mean the same thing for every model.
    with pytest.raises(SasaError):
        make_spec("resnet50", kernel_size=4)


def test_image_size_multiples_of_32_build() -> None:
    for size in (32, 96):
        model = create_model("sasa_resnet26", image_size=size, num_classes=2, width=0.25, heads=2).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, size, size)).shape == (1, 2)


def test_zero_init_residual_makes_every_block_start_as_its_shortcut() -> None:
    from sasa_bench.models.resnet import Bottleneck, zero_init_residual

    model = create_model("sasa_resnet26", width=0.25, image_size=32, num_classes=10).eval()
    zero_init_residual(model)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert blocks and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.stem(x)
        for b in blocks:  # residual branch contributes bn3's bias only (zero at init)
            expected = torch.relu(h if b.downsample is None else b.downsample(h))
            h = b(h)
            torch.testing.assert_close(h, expected)
