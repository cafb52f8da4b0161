"""The stems: the paper's attention stem against a slow loop reference, its Table 7 variants,
and the conv stem.

The attention stem: every pixel attends to the 16 pixels of its own 4x4 block, with logits
q_ij . k_ab + q_ij[:Dr] . rel_row[a-i] + q_ij[Dr:] . rel_col[b-j] (offsets -3..3, index offset+3)
per head, and spatially aware values v_ab = sum_m p(a, b, m) W_V^m x_ab where
p(a, b, m) = softmax_m((emb_row(a) + emb_col(b)) . nu_m) with (a, b) the position inside the block,
shared across heads. Then BatchNorm, then a 4x4 max-pool.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sasa_bench import SasaError, make_spec
from sasa_bench.layers.stems import AttentionStem, ConvStem, make_stem

B = 4  # block size


def slow_values(stem: AttentionStem, x: torch.Tensor) -> torch.Tensor:
    """The stem's values, pixel by pixel: [B, C_out, H, W]."""
    bsz, cin, h, w = x.shape
    cout = stem.query.weight.shape[0]
    if stem.values == "plain":
        wv = stem.value.weight[:, :, 0, 0]
        return torch.stack(
            [torch.stack([x[:, :, i, j] @ wv.t() for j in range(w)], -1) for i in range(h)], -2
        )
    if stem.values == "conv":  # a 3x3 "same" convolution, written out
        wv = stem.value.weight  # [C_out, C_in, 3, 3]
        rows = []
        for i in range(h):
            cols = []
            for j in range(w):
                acc = torch.zeros(bsz, cout, dtype=x.dtype)
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        a, b = i + di, j + dj
                        if 0 <= a < h and 0 <= b < w:
                            acc = acc + x[:, :, a, b] @ wv[:, :, di + 1, dj + 1].t()
                cols.append(acc)
            rows.append(torch.stack(cols, -1))
        return torch.stack(rows, -2)
    # spatially aware values: a per-position mixture of m value matrices
    m = stem.mixtures
    wv = stem.value.weight[:, :, 0, 0].view(m, cout, cin)  # W_V^m
    rows = []
    for i in range(h):
        cols = []
        for j in range(w):
            pa, pb = i % B, j % B
            emb = stem.emb_row[pa] + stem.emb_col[pb]
            p = torch.softmax(torch.stack([emb @ stem.mix[mm] for mm in range(m)]), dim=0)
            w_mix = sum(p[mm] * wv[mm] for mm in range(m))  # [C_out, C_in]
            cols.append(x[:, :, i, j] @ w_mix.t())
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def slow_stem_attention(stem: AttentionStem, x: torch.Tensor) -> torch.Tensor:
    """Block-local attention, one pixel and one block position at a time (heads side by side,
    each with its own softmax): [B, C_out, H, W]."""
    bsz, _, h, w = x.shape
    cout = stem.query.weight.shape[0]
    n = stem.heads
    d = cout // n
    dr = d // 2
    wq, wk = stem.query.weight[:, :, 0, 0], stem.key.weight[:, :, 0, 0]
    v = slow_values(stem, x).reshape(bsz, n, d, h, w)
    keys = [[(x[:, :, a, b] @ wk.t()).view(bsz, n, d) for b in range(w)] for a in range(h)]
    out_rows = []
    for i in range(h):
        out_row = []
        for j in range(w):
            q = (x[:, :, i, j] @ wq.t()).view(bsz, n, d)
            logits, values = [], []
            i0, j0 = (i // B) * B, (j // B) * B
            for a in range(i0, i0 + B):
                for b in range(j0, j0 + B):
                    logit = (q * keys[a][b]).sum(-1)  # [B, N]
                    logit = logit + (q[..., :dr] * stem.rel_row[a - i + B - 1]).sum(-1)
                    logit = logit + (q[..., dr:] * stem.rel_col[b - j + B - 1]).sum(-1)
                    logits.append(logit)
                    values.append(v[..., a, b])  # [B, N, D]
            wts = torch.softmax(torch.stack(logits, -1), -1)  # [B, N, 16]
            y = sum(wts[..., t, None] * values[t] for t in range(len(values)))
            out_row.append(y.reshape(bsz, cout))
        out_rows.append(torch.stack(out_row, -1))
    return torch.stack(out_rows, -2)


VARIANTS = ["attention", "attention-plain", "attention-conv-values"]


def _stem(kind: str, cout: int = 16, heads: int = 4, mixtures: int = 4) -> AttentionStem:
    stem = make_stem(kind, 3, cout, heads=heads, mixtures=mixtures).double()
    with torch.no_grad():  # logits and mixtures far from uniform
        stem.query.weight.mul_(2.0)
        for name in ("rel_row", "rel_col", "emb_row", "emb_col", "mix"):
            if hasattr(stem, name):
                getattr(stem, name).normal_(0, 1.0)
    return stem


@pytest.mark.parametrize(("kind", "cout", "heads", "mixtures"), [
    ("attention", 16, 4, 4),
    ("attention", 12, 2, 3),  # D = 6, 3 mixtures
    ("attention", 8, 4, 1),
    ("attention-plain", 16, 4, 4),
    ("attention-conv-values", 16, 4, 4),
])
def test_attention_stem_matches_loop(kind: str, cout: int, heads: int, mixtures: int) -> None:
    stem = _stem(kind, cout, heads, mixtures)
    x = torch.randn(2, 3, 8, 4, dtype=torch.float64, requires_grad=True)  # 2 x 1 blocks
    fast = stem.attend(x)
    slow = slow_stem_attention(stem, x)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(fast)
    params = [x, *stem.parameters()]
    gf = torch.autograd.grad((fast * g).sum(), params, allow_unused=True)
    gs = torch.autograd.grad((slow * g).sum(), params, allow_unused=True)
    names = ["input", *(n for n, _ in stem.named_parameters())]
    for name, p, a, b in zip(names, params, gf, gs, strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_attention_stays_inside_its_block() -> None:
    stem = _stem("attention-plain")
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = stem.attend(x)
        x2 = x.clone()
        x2[0, :, 5, 6] += 1.0  # block (1, 1)
        y2 = stem.attend(x2)
    changed = (y2 - y).abs().amax(1)[0] > 0  # [H, W]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:8, 4:8] = True
    assert torch.equal(changed, expected)


def test_mixture_weights_are_a_softmax_over_mixtures() -> None:
    stem = _stem("attention")
    p = stem.mixture_weights()
    assert p.shape == (4, B, B)
    torch.testing.assert_close(p.sum(0), torch.ones(B, B, dtype=p.dtype))
    a, b = 2, 1
    logits = torch.stack([(stem.emb_row[a] + stem.emb_col[b]) @ stem.mix[m] for m in range(4)])
    torch.testing.assert_close(p[:, a, b], torch.softmax(logits, 0))


@pytest.mark.parametrize("kind", VARIANTS)
def test_bn_then_4x4_max_pool(kind: str) -> None:
    stem = _stem(kind).eval()
    with torch.no_grad():  # a BN with negative scales: BN-then-pool differs from pool-then-BN
        stem.bn.weight.copy_(torch.randn(16, dtype=torch.float64))
        stem.bn.bias.copy_(torch.randn(16, dtype=torch.float64))
        stem.bn.running_mean.copy_(torch.randn(16, dtype=torch.float64))
        stem.bn.running_var.copy_(torch.rand(16, dtype=torch.float64) + 0.5)
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        a = stem.attend(x)  # checked against the loop above
        bn = stem.bn
        expected = F.max_pool2d(
            F.batch_norm(a, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps), 4, 4
        )
        torch.testing.assert_close(stem(x), expected, rtol=1e-9, atol=1e-10)
        other = F.batch_norm(F.max_pool2d(a, 4, 4), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                             bn.eps)
        assert not torch.allclose(stem(x), other)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", VARIANTS)
def test_fused_inference_stem_equals_attend_bn_pool(kind: str, dtype: torch.dtype) -> None:
    from sasa_bench.kernels import stem_cpu

    if not (stem_cpu.is_available() and stem_cpu.load()):
        pytest.skip("no C++ compiler: the fused stem kernel is not built")
    stem = _stem(kind).to(dtype).eval()
    with torch.no_grad():
        stem.bn.weight.copy_(torch.randn(16))  # negative scales: the max must follow the affine
        stem.bn.bias.copy_(torch.randn(16))
        stem.bn.running_mean.copy_(torch.randn(16))
        stem.bn.running_var.copy_(torch.rand(16) + 0.5)
    x = torch.randn(2, 3, 12, 8, dtype=dtype)
    expected = stem.pool(stem.bn(stem._attend_paper(x))).detach()  # grad enabled: the unfused path
    with torch.no_grad():
        assert stem._fused_inference_ok(x)
        fused = stem(x)
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(fused, expected, **tol)
    stem.train()
    with torch.no_grad():  # training-mode BN needs batch statistics of the full map: not fused
        assert not stem._fused_inference_ok(x)


@pytest.mark.parametrize("kind", ["conv", *VARIANTS])
def test_stems_take_224_to_56(kind: str) -> None:
    stem = make_stem(kind, 3, 64)
    with torch.no_grad():
        y = stem(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 64, 56, 56)
    assert torch.isfinite(y).all()


def test_conv_stem_is_torchvisions() -> None:
    stem = ConvStem(3, 64)
    assert (stem.conv1.kernel_size, stem.conv1.stride, stem.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert stem.conv1.bias is None
    assert (stem.maxpool.kernel_size, stem.maxpool.stride, stem.maxpool.padding) == (3, 2, 1)


def test_table7_variants_in_full_models() -> None:
    for kind in VARIANTS:
        spec = make_spec("sasa_resnet26", stem=kind, image_size=32, num_classes=3, width=0.25, heads=2)
        assert spec.stem == kind
    from sasa_bench import create_model

    model = create_model("sasa_resnet26", stem="attention-conv-values", image_size=32, num_classes=3,
                         width=0.25, heads=2).eval()
    assert isinstance(model.stem, AttentionStem) and model.stem.values == "conv"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_bad_stems_raise_sasa_error() -> None:
    with pytest.raises(SasaError):
        make_stem("foo", 3, 64)
    with pytest.raises(SasaError):
        make_spec("sasa_resnet50", stem="foo")
    with pytest.raises(SasaError):
        make_stem("attention", 3, 64, heads=5)  # heads must divide the stem width
    with pytest.raises(SasaError):
        make_stem("attention", 3, 64, mixtures=0)
    with pytest.raises(SasaError):
        make_spec("sasa_resnet50", stem_mixtures=0)
    with pytest.raises(SasaError):
        make_stem("attention", 3, 16)(torch.randn(1, 3, 6, 8))  # not a multiple of the block


# The runtime paths (fused CPU kernel, pure-PyTorch block layout) against the paper's formulation,
# which the FLOP counters see; and the FLOP-counting switch.

RUNTIME_CASES = [
    ("attention", 16, 4, 4),
    ("attention", 12, 2, 3),
    ("attention", 8, 4, 1),
    ("attention-plain", 16, 4, 4),
    ("attention-conv-values", 16, 4, 4),
]


def _paths(stem: AttentionStem) -> list:
    from sasa_bench.kernels import stem_cpu

    paths = [stem._attend_torch]
    if stem_cpu.is_available() and stem_cpu.load():
        paths.append(stem._attend_kernel)
    return paths


def _grads(fn, stem: AttentionStem, x: torch.Tensor, g: torch.Tensor | None = None):  # noqa: ANN001, ANN202
    y = fn(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y) if g is None else g
    params = [x, *stem.parameters()]
    grads = torch.autograd.grad((y * g).sum(), params, allow_unused=True)
    return y, [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("kind", "cout", "heads", "mixtures"), RUNTIME_CASES)
def test_runtime_paths_match_the_paper_formulation(kind: str, cout: int, heads: int, mixtures: int,
                                                   dtype: torch.dtype) -> None:
    stem = _stem(kind, cout, heads, mixtures).to(dtype)
    x = torch.randn(2, 3, 8, 12, dtype=dtype, requires_grad=True)
    ref, ref_grads = _grads(stem._attend_paper, stem, x)
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for fn in _paths(stem):
        y, grads = _grads(fn, stem, x)
        torch.testing.assert_close(y, ref, **tol)
        names = ["input", *(n for n, _ in stem.named_parameters())]
        for name, a, b in zip(names, grads, ref_grads, strict=True):
            scale = b.abs().max().clamp_min(1.0)  # relative to the gradient's size
            torch.testing.assert_close(a / scale, b / scale, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_attend_dispatches_to_the_kernel_or_torch_path() -> None:
    stem = _stem("attention")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stem.attend(x), stem._attend_paper(x), rtol=1e-9, atol=1e-10)


def test_flop_counting_sees_the_paper_formulation() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from sasa_bench.kernels.op import counting_flops

    stem = make_stem("attention", 3, 16, heads=4, mixtures=4)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), counting_flops(), FlopCounterMode(display=False) as counter:
        stem(x)
    px = 8 * 8
    convs = px * 3 * (16 + 16 + 16 * 4)  # q, k and the m = 4 value projections at full resolution
    attention = px * 4 * 16 * (4 + 4 + 4)  # per head: q.k, q.r, weighted sum over the 16 block pixels
    mixture_logits = 16 * 16 * 4  # (emb_row + emb_col) . nu_m: 16 positions, E = 16, m = 4
    assert counter.get_total_flops() == 2 * (convs + attention + mixture_logits)


def test_mixture_folds_into_per_position_value_weights() -> None:
    stem = _stem("attention")
    w = stem.position_weights()  # [16, 3C, C_in]
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    v = F.conv2d(x, stem.value.weight)  # the m value projections
    p = stem.mixture_weights().repeat(1, 2, 2)  # [m, H, W]
    mixed = (v.view(1, 4, 16, 8, 8) * p[None, :, None]).sum(1)
    wv = w[:, 32:].view(4, 4, 16, 3)  # [a, b, C, C_in]
    for i in range(8):
        for j in range(8):
            torch.testing.assert_close(mixed[0, :, i, j], wv[i % 4, j % 4] @ x[0, :, i, j])


@pytest.mark.parametrize("kind", VARIANTS)
def test_runtime_paths_run_under_bf16_autocast(kind: str) -> None:
    stem = make_stem(kind, 3, 16)
    x = torch.randn(2, 3, 16, 8)
    ref = stem.attend(x).detach()
    for fn in _paths(stem):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.float().sum().backward()
        torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in stem.parameters())


def test_kernel_forward_survives_nan_weights() -> None:
    """A diverged model (NaN weights) gives NaN outputs, not an exception from the kernel's checks."""
    from sasa_bench.kernels import stem_cpu

    if not (stem_cpu.is_available() and stem_cpu.load()):
        pytest.skip("no C++ compiler: the fused stem kernel is not built")
    stem = _stem("attention").float()
    with torch.no_grad():
        stem.query.weight[0, 0] = float("nan")
    y = stem._attend_kernel(torch.randn(1, 3, 8, 8))
    assert torch.isnan(y).any()


@pytest.mark.parametrize("backend", ["reference", "shift", "auto"])
def test_stem_honours_the_backend(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--backend reference`` runs the paper's formulation, ``shift`` the PyTorch block path,
    ``auto`` the fused kernel where it is built; all compute the same stem."""
    from sasa_bench.kernels import stem_cpu
    from sasa_bench.layers.stems import AttentionStem

    stem = AttentionStem(3, 16, heads=2, backend=backend).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    called = []
    for name in ("_attend_paper", "_attend_torch", "_attend_kernel"):
        orig = getattr(AttentionStem, name)

        def spy(self, x, _orig=orig, _name=name):  # noqa: ANN001, ANN202
            called.append(_name)
            return _orig(self, x)

        monkeypatch.setattr(AttentionStem, name, spy)
    y = stem.attend(x)
    want = {"reference": "_attend_paper", "shift": "_attend_torch"}.get(
        backend, "_attend_kernel" if stem_cpu.load() else "_attend_torch"
    )
    assert called == [want]
    ref = AttentionStem(3, 16, heads=2, backend="reference").double()
    ref.load_state_dict(stem.state_dict())
    torch.testing.assert_close(y, ref.attend(x), rtol=1e-9, atol=1e-9)


def test_stem_opcheck() -> None:
    """Schema, fake kernel, autograd registration and AOT dispatch of the stem ops."""
    from sasa_bench.kernels import stem_cpu
    from sasa_bench.layers.stems import AttentionStem

    if not stem_cpu.load():
        pytest.skip("C++ kernels unavailable")
    for values in ("mixture", "conv"):
        stem = AttentionStem(3, 16, heads=2, values=values)
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        w = stem.position_weights().permute(1, 2, 0).detach().requires_grad_()
        r = stem._relative_table().permute(1, 2, 0).detach().requires_grad_()
        vmap = stem.value(x).detach().requires_grad_() if values == "conv" else None
        torch.library.opcheck(torch.ops.sasa.stem_attention.default, (x, w, r, vmap, 2))
        scale, shift = torch.rand(16) + 0.5, torch.randn(16)
        args = (x.detach(), w.detach(), r.detach(), None if vmap is None else vmap.detach(), 2, scale, shift)
        torch.library.opcheck(torch.ops.sasa.stem_attention_pooled.default, args)
