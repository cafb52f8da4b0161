"""LocalSelfAttention2d against the paper's equation, written out as a slow explicit loop.

    y_ij = sum_{(a,b) in N_k(i,j)} softmax_ab( q_ij . k_ab + q_ij[:Dr] . r_row[a-i] + q_ij[Dr:] . r_col[b-j] ) v_ab

The loop reference below reads only the layer's parameters (the 1x1 projection weights and the
relative embedding tables) and recomputes everything else, one pixel, one head, one window
position at a time. Conventions it encodes (the project's documented choices):
- window index t <-> offset t - k//2; r_row[t] embeds row offset t - k//2 (r_col likewise);
- the head dimension D splits into Dr = D // 2 row channels and D - Dr column channels;
- border "mask": positions outside the image are left out of the softmax; "zeros": they are zero
  keys and zero values that still take softmax weight exp(q.r);
- pos "absolute": the key of pixel (a, b) gets the Transformer sinusoid of (a, b) added (rows in
  the first Dr channels, columns in the rest), re-derived here from the textbook formula;
- logits "qr": there is no key projection, so no q.k term;
- scale "rsqrt": q is multiplied by 1/sqrt(D).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sasa_bench import LocalSelfAttention2d, SasaError, available_backends

POS = ("relative", "absolute", "none")
LOGITS = ("qk+qr", "qr")
BORDER = ("mask", "zeros")
SCALE = ("none", "rsqrt")


# --------------------------------------------------------------------------------------------
# The slow, independent reference
# --------------------------------------------------------------------------------------------


def sinusoid(pos: int, dim: int) -> list[float]:
    """Vaswani et al.'s encoding: PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(same)."""
    out = []
    for c in range(dim):
        angle = pos / 10000 ** ((c - c % 2) / dim)
        out.append(math.sin(angle) if c % 2 == 0 else math.cos(angle))
    return out


def absolute_position(a: int, b: int, d: int, like: torch.Tensor) -> torch.Tensor:
    dr = d // 2
    return torch.tensor(sinusoid(a, dr) + sinusoid(b, d - dr), dtype=like.dtype, device=like.device)


def slow_attention(layer: LocalSelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The paper's equation with explicit loops over pixels, heads and window positions."""
    bsz, _, h, w = x.shape
    n, cout, kk = layer.heads, layer.out_channels, layer.kernel_size
    d = cout // n
    dr = d // 2
    r = kk // 2
    wq = layer.query.weight[:, :, 0, 0]
    wk = layer.key.weight[:, :, 0, 0] if layer.logits == "qk+qr" else None
    wv = layer.value.weight[:, :, 0, 0]
    rows = layer.rel.row if layer.pos == "relative" else None
    cols = layer.rel.col if layer.pos == "relative" else None
    scale = d**-0.5 if layer.scale == "rsqrt" else 1.0

    def pix(i: int, j: int) -> torch.Tensor:
        return x[:, :, i, j]  # [B, C_in]

    out_rows = []
    for i in range(h):
        out_row = []
        for j in range(w):
            q_all = pix(i, j) @ wq.t() * scale  # [B, C_out]
            heads_out = []
            for head in range(n):
                sl = slice(head * d, (head + 1) * d)
                q = q_all[:, sl]
                logits, values = [], []
                for t in range(kk):
                    for u in range(kk):
                        a, b = i + t - r, j + u - r
                        inside = 0 <= a < h and 0 <= b < w
                        if not inside and layer.border == "mask":
                            continue
                        logit = torch.zeros(bsz, dtype=x.dtype)
                        if inside:
                            key = None
                            if wk is not None:
                                key = (pix(a, b) @ wk.t())[:, sl]
                            if layer.pos == "absolute":
                                p = absolute_position(a, b, d, x)
                                key = p.expand(bsz, d) if key is None else key + p
                            if key is not None:
                                logit = logit + (q * key).sum(-1)
                            value = (pix(a, b) @ wv.t())[:, sl]
                        else:  # "zeros": a zero key (no q.k term) and a zero value
                            value = torch.zeros(bsz, d, dtype=x.dtype)
                        if rows is not None:
                            logit = logit + (q[:, :dr] * rows[t]).sum(-1) + (q[:, dr:] * cols[u]).sum(-1)
                        logits.append(logit)
                        values.append(value)
                weights = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # [B, M]
                y = sum(weights[:, m, None] * values[m] for m in range(len(values)))
                heads_out.append(y)
            out_row.append(torch.cat(heads_out, dim=1))  # [B, C_out]
        out_rows.append(torch.stack(out_row, dim=-1))  # [B, C_out, W]
    return torch.stack(out_rows, dim=-2)  # [B, C_out, H, W]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def make_layer(cin: int = 3, cout: int = 8, dtype: torch.dtype = torch.float64, **kw) -> LocalSelfAttention2d:
    layer = LocalSelfAttention2d(cin, cout, **kw).to(dtype)
    with torch.no_grad():  # make the logits matter: a softmax far from uniform
        layer.query.weight.mul_(2.0)
        if layer.rel is not None:
            layer.rel.row.normal_(0, 1.0)
            layer.rel.col.normal_(0, 1.0)
    return layer


def grads(layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """d(sum(out * g)) / d(input, every parameter); an unused tensor (the query weights when the
    logits have no term at all: pos "none" with logits "qr") gets a zero gradient."""
    params = [x, *layer.parameters()]
    gs = torch.autograd.grad((out * g).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, gs, strict=True)]


def check_against_loop(
    layer: LocalSelfAttention2d, shape: tuple[int, ...], rtol: float = 1e-9, atol: float = 1e-10
) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    fast = layer(x)
    slow = slow_attention(layer, x)
    assert fast.shape == (shape[0], layer.out_channels, shape[2], shape[3])
    torch.testing.assert_close(fast, slow, rtol=rtol, atol=atol)
    g = torch.randn_like(fast)
    names = ["input", *(n for n, _ in layer.named_parameters())]
    for name, gf, gs in zip(names, grads(layer, x, fast, g), grads(layer, x, slow, g), strict=True):
        torch.testing.assert_close(gf, gs, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad of {name}: {m}")


def tol(pos: str) -> dict[str, float]:
    # The layer computes the sinusoids in float32 before casting to the input's dtype.
    return {"rtol": 1e-5, "atol": 1e-5} if pos == "absolute" else {}


# --------------------------------------------------------------------------------------------
# Against the loop reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pos", "logits", "border", "scale"),
    # pos "none" with logits "qr" leaves no logit term at all; the layer rejects it.
    [c for c in itertools.product(POS, LOGITS, BORDER, SCALE) if c[:2] != ("none", "qr")],
)
def test_every_option_matches_loop(pos: str, logits: str, border: str, scale: str) -> None:
    layer = make_layer(3, 8, kernel_size=3, heads=2, pos=pos, logits=logits, border=border, scale=scale)
    check_against_loop(layer, (2, 3, 4, 5), **tol(pos))


@pytest.mark.parametrize("border", BORDER)
@pytest.mark.parametrize("heads", [1, 2, 8])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_kernel_sizes_and_heads_match_loop(k: int, heads: int, border: str) -> None:
    # 16 channels: 8 heads leave D = 2 (one row and one column channel per head).
    layer = make_layer(4, 16, kernel_size=k, heads=heads, border=border)
    check_against_loop(layer, (2, 4, 5, 4))


def test_odd_head_dim_and_single_channel_heads_match_loop() -> None:
    # D = 3: the row half gets 1 channel, the column half 2; D = 1: the row half is empty.
    check_against_loop(make_layer(2, 6, kernel_size=3, heads=2, pos="absolute"), (1, 2, 3, 4), **tol("absolute"))
    check_against_loop(make_layer(2, 6, kernel_size=3, heads=2), (1, 2, 3, 4))
    check_against_loop(make_layer(2, 4, kernel_size=3, heads=4, border="zeros"), (1, 2, 3, 3))


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("border", BORDER)
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("hw", [(1, 1), (1, 3), (2, 5), (4, 1), (3, 2)])
def test_maps_smaller_than_the_window_match_loop(hw: tuple[int, int], k: int, border: str, pos: str) -> None:
    layer = make_layer(3, 8, kernel_size=k, heads=2, pos=pos, border=border)
    check_against_loop(layer, (2, 3, *hw), **tol(pos))


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("border", BORDER)
@pytest.mark.parametrize("k", [3, 5])
def test_locality(k: int, border: str) -> None:
    layer = make_layer(3, 8, kernel_size=k, heads=2, border=border)
    h, w, (pi, pj) = 9, 8, (4, 3)
    x = torch.randn(1, 3, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref = layer(x)[0, :, pi, pj]
        for a, b in itertools.product(range(h), range(w)):
            x2 = x.clone()
            x2[0, :, a, b] += 1.0
            y = layer(x2)[0, :, pi, pj]
            inside = abs(a - pi) <= k // 2 and abs(b - pj) <= k // 2
            if inside:
                assert not torch.allclose(y, ref, rtol=0, atol=1e-9), f"pixel {(a, b)} inside the window"
            else:
                assert torch.equal(y, ref), f"pixel {(a, b)} outside the window changed the output"


@pytest.mark.parametrize("pos", ["relative", "none"])
@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("border", BORDER)
def test_translation_equivariance_in_the_interior(pos: str, logits: str, border: str) -> None:
    if (pos, logits) == ("none", "qr"):
        pytest.skip("no logit term at all: rejected by the layer")
    k = 5
    layer = make_layer(3, 8, kernel_size=k, heads=2, pos=pos, logits=logits, border=border)
    x = torch.randn(1, 3, 18, 17, dtype=torch.float64)
    dy, dx = 2, 3
    with torch.no_grad():
        y = layer(x)
        y_shift = layer(torch.roll(x, (dy, dx), dims=(2, 3)))
    # Away from the borders and from the wrapped-around rows/columns, by more than the window radius.
    m = k // 2 + max(dy, dx) + 1
    a, b = y_shift[..., m:-m, m:-m], torch.roll(y, (dy, dx), dims=(2, 3))[..., m:-m, m:-m]
    assert a.shape[-2:] == (18 - 2 * m, 17 - 2 * m) and a.numel() > 0
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_absolute_positions_break_translation_equivariance() -> None:
    # The same check must fail for absolute positions: it is able to detect position dependence.
    k = 5
    layer = make_layer(3, 8, kernel_size=k, heads=2, pos="absolute")
    x = torch.randn(1, 3, 18, 17, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        y_shift = layer(torch.roll(x, (2, 3), dims=(2, 3)))
    m = k // 2 + 3 + 1
    a, b = y_shift[..., m:-m, m:-m], torch.roll(y, (2, 3), dims=(2, 3))[..., m:-m, m:-m]
    assert a.numel() > 0
    assert not torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [3, 5])
def test_zeros_border_differs_from_mask_only_at_the_border(k: int) -> None:
    mask = make_layer(3, 8, kernel_size=k, heads=2, border="mask")
    zeros = make_layer(3, 8, kernel_size=k, heads=2, border="zeros")
    zeros.load_state_dict(mask.state_dict())
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64)
    with torch.no_grad():
        ym, yz = mask(x), zeros(x)
    r = k // 2
    torch.testing.assert_close(ym[..., r:-r, r:-r], yz[..., r:-r, r:-r], rtol=1e-12, atol=1e-12)
    for edge in (ym[..., :r, :] - yz[..., :r, :], ym[..., -r:, :] - yz[..., -r:, :],
                 ym[..., :, :r] - yz[..., :, :r], ym[..., :, -r:] - yz[..., :, -r:]):
        # every border pixel of every channel differs
        assert (edge.abs() > 1e-9).all()


def test_k1_border_options_agree() -> None:
    mask = make_layer(3, 8, kernel_size=1, heads=2, border="mask")
    zeros = make_layer(3, 8, kernel_size=1, heads=2, border="zeros")
    zeros.load_state_dict(mask.state_dict())
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mask(x), zeros(x), rtol=1e-12, atol=1e-12)
        # with a single key the softmax is 1: the output is the value projection
        v = torch.einsum("oc,bchw->bohw", mask.value.weight[:, :, 0, 0], x)
        torch.testing.assert_close(mask(x), v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [3, 7])
def test_single_pixel_mask_returns_its_own_value(k: int) -> None:
    """On a 1x1 map only the centre lies inside: with "mask" its weight is exactly 1."""
    layer = make_layer(3, 8, kernel_size=k, heads=2, border="mask")
    zeros = make_layer(3, 8, kernel_size=k, heads=2, border="zeros")
    zeros.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    v = torch.einsum("oc,bchw->bohw", layer.value.weight[:, :, 0, 0], x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), v, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(zeros(x), v)


def test_mask_gives_outside_positions_no_weight_even_with_huge_logits() -> None:
    k, r = 3, 1
    layer = make_layer(3, 8, kernel_size=k, heads=2, border="mask")
    zeros = make_layer(3, 8, kernel_size=k, heads=2, border="zeros")
    x = torch.rand(1, 3, 5, 6, dtype=torch.float64) + 0.5  # positive input
    with torch.no_grad():
        layer.query.weight.abs_()  # q > 0 in every channel
        layer.key.weight.zero_()  # no q.k term: only q.r decides
        layer.value.weight.abs_()  # v > 0 in every channel
        layer.rel.row.zero_()
        layer.rel.col.zero_()
        layer.rel.row[0] = 200.0  # offset -1 (the row above): a huge q.r
        zeros.load_state_dict(layer.state_dict())
        ym, yz = layer(x), zeros(x)
        v = torch.einsum("oc,bchw->bohw", layer.value.weight[:, :, 0, 0], x)
    assert torch.isfinite(ym).all()
    # Row 0: the row above lies outside. "zeros" puts (nearly) all mass on its zero values...
    assert yz[..., 0, :].abs().max() < 1e-6
    # ...while "mask" keeps every weight on real pixels: a convex combination of in-image values
    # (v > 0), equal to the loop reference that never visits outside positions.
    assert (ym[..., 0, :] > 1e-3).all()
    torch.testing.assert_close(ym, slow_attention(layer, x), rtol=1e-9, atol=1e-10)
    # Interior rows put (nearly) all mass on the row above: the mean of its values over the window.
    assert r == 1
    above = torch.nn.functional.avg_pool2d(
        v, (1, 3), stride=1, padding=(0, 1), count_include_pad=False
    )  # mean over the in-image columns j-1..j+1 of row i
    torch.testing.assert_close(ym[..., 1:, :], above[..., :-1, :], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"kernel_size": 4},
        {"kernel_size": 0},
        {"kernel_size": -3},
        {"heads": 3},
        {"heads": 0},
        {"pos": "rotary"},
        {"logits": "qk"},
        {"border": "reflect"},
        {"scale": "sqrt"},
        {"pos": "none", "logits": "qr"},
        {"backend": "no-such-backend"},
    ],
)
def test_bad_arguments_raise_sasa_error(kw: dict) -> None:
    with pytest.raises(SasaError):
        LocalSelfAttention2d(4, 8, **{"heads": 2, **kw})


# --------------------------------------------------------------------------------------------
# Every backend usable here equals the reference (layer level)
# --------------------------------------------------------------------------------------------


def _backend_cases() -> list:
    cases = []
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]:
        for name in available_backends(device):
            if name != "auto":
                cases.append(pytest.param(name, device, id=f"{name}-{device}"))
    return cases


BACKEND_OPTIONS = [
    # (pos, logits, border, scale, k, heads, shape)
    ("relative", "qk+qr", "mask", "none", 7, 8, (2, 16, 14, 13)),
    ("relative", "qk+qr", "zeros", "none", 3, 2, (2, 16, 5, 7)),
    ("relative", "qr", "mask", "rsqrt", 5, 1, (1, 16, 6, 6)),
    ("relative", "qr", "zeros", "none", 5, 4, (1, 16, 6, 6)),
    ("absolute", "qk+qr", "mask", "none", 3, 4, (2, 16, 4, 5)),
    ("absolute", "qr", "zeros", "none", 3, 4, (2, 16, 4, 5)),
    ("none", "qk+qr", "zeros", "rsqrt", 5, 2, (1, 16, 5, 3)),
    ("relative", "qk+qr", "mask", "none", 1, 2, (1, 16, 3, 3)),
    ("relative", "qk+qr", "mask", "none", 7, 2, (2, 16, 2, 5)),  # maps smaller than the window
    ("relative", "qk+qr", "zeros", "none", 7, 2, (1, 16, 1, 3)),
    ("relative", "qk+qr", "mask", "none", 7, 8, (1, 16, 1, 1)),
]


@pytest.mark.parametrize(("pos", "logits", "border", "scale", "k", "heads", "shape"), BACKEND_OPTIONS)
@pytest.mark.parametrize(("backend", "device"), _backend_cases())
def test_backend_matches_reference(
    backend: str, device: str, pos: str, logits: str, border: str, scale: str, k: int, heads: int, shape: tuple
) -> None:
    """Forward and every gradient of a float32 layer on ``backend`` vs the float64 reference
    backend (which the loop tests above pin to the paper's equation)."""
    opts = {"kernel_size": k, "heads": heads, "pos": pos, "logits": logits, "border": border, "scale": scale}
    ref = make_layer(shape[1], 16, dtype=torch.float64, backend="reference", **opts)
    layer = LocalSelfAttention2d(shape[1], 16, backend=backend, **opts)
    layer.load_state_dict({n: t.float() for n, t in ref.state_dict().items()})
    layer = layer.to(device)
    x64 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x = x64.detach().float().to(device).requires_grad_(True)
    y = layer(x)
    y_ref = ref(x64)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y_ref)
    names = ["input", *(n for n, _ in ref.named_parameters())]
    for name, a, b in zip(names, grads(layer, x, y, g.float().to(device)), grads(ref, x64, y_ref, g), strict=True):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"grad of {name}: {m}")


# --------------------------------------------------------------------------------------------
# torch.compile: the attention core and the stem are torch.library ops, so a SASA model is one
# graph (no breaks) and the compiled model computes what the eager one does, gradients included.
# --------------------------------------------------------------------------------------------


def _small(preset: str) -> torch.nn.Module:
    from sasa_bench import create_model

    return create_model(preset, width=0.25, image_size=32, num_classes=10, depth=26)


@pytest.mark.parametrize("backend", ["auto", *(pytest.param(b, marks=pytest.mark.slow) for b in ("shift", "reference"))])
def test_dynamo_sees_no_graph_break_in_a_layer(backend: str) -> None:
    layer = make_layer(8, 8, torch.float32, kernel_size=3, heads=2, backend=backend)
    explained = torch._dynamo.explain(layer)(torch.randn(1, 8, 6, 6))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_dynamo_sees_no_graph_break_in_a_sasa_model(train: bool) -> None:
    model = _small("sasa_resnet50").train(train)
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(train):
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _compile_matches_eager(preset: str) -> None:
    torch._dynamo.reset()
    # float64: a 26-layer net with batch-2 BatchNorm amplifies fp32 reordering (inductor fuses
    # and reorders) to ~1e-3; in float64 any real difference stands out
    model = _small(preset).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = model(x)
    want.square().sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    got = torch.compile(model, fullgraph=True)(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
    for g, w in zip((p.grad for p in model.parameters()), want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * max(1.0, w.abs().max().item()))
    model.eval()
    with torch.no_grad():  # inference: the pooled stem op
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-7, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sasa_resnet50", "sasa_resnet50_convstem"])
def test_compiled_model_matches_eager(preset: str) -> None:
    """torch.compile(fullgraph=True) on small versions of the presets (depth 26, width 1/4,
    32x32): forward, every parameter gradient, and the inference path."""
    _compile_matches_eager(preset)


def test_inference_weight_cache_follows_weight_changes() -> None:
    """Without autograd the stacked q/k/v weight is cached; an in-place change (an optimizer
    step, load_state_dict) must invalidate it."""
    layer = make_layer(4, 8, kernel_size=3, heads=2)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y0 = layer(x)
        layer.key.weight.mul_(3.0)
        y1 = layer(x)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, layer(x).detach())  # the autograd path (no cache) agrees


@pytest.mark.parametrize("hw", [(24, 24), (7, 9)], ids=["bmm-per-image", "folded-matmul"])
def test_cpu_projection_paths_match_the_conv(hw: tuple[int, int]) -> None:
    """The CPU projection's matrix products (one GEMM per image on large maps, one folded GEMM on
    small ones) compute the 1x1 conv: same output and gradients as the conv2d path, which a
    channels-last input takes."""
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(8, 16, kernel_size=3, heads=2, backend="reference").double()
    x = torch.randn(2, 8, *hw, dtype=torch.float64)
    outs = []
    for inp in (x.clone(), x.to(memory_format=torch.channels_last)):
        inp.requires_grad_(True)
        y = layer(inp)
        g = torch.autograd.grad(y, [inp, *layer.parameters()], torch.ones_like(y))
        outs.append([y, *g])
    assert layer.query.weight.grad is None
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
