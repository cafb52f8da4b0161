"""Every fast attention backend computes the reference operator: forward and all gradients.

Coverage (issue 4): borders, maps smaller than k, k in {1,3,5,7,9,11}, heads in {1,2,4,8}, no
keys (Table 6's q.r only) / no relative embeddings, both border modes, batch 1 and > 1,
non-contiguous inputs; FLOP counts do not depend on the backend; the C++ backend falls back
cleanly (one warning) where it cannot be built. fp32 tolerance: 1e-4 relative to the largest
entry of the float64 reference.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from sasa_bench.kernels import available_backends, local_attention, resolve_backend
from sasa_bench.kernels import cpu_fused as cpu_fused_mod
from sasa_bench.kernels.reference import local_attention_reference
from sasa_bench.kernels.registry import all_backends

FAST = [name for name in ("cpu_fused", "shift") if name in available_backends("cpu")]

# (batch, heads, head_dim, value_dim, H, W, k, mask_border, has_k, has_rel)
CASES = [
    (2, 2, 4, 4, 9, 11, 5, True, True, True),
    (2, 2, 4, 4, 9, 11, 5, False, True, True),
    (1, 1, 3, 3, 5, 5, 1, True, True, True),  # k = 1: a per-pixel softmax of one logit
    (1, 8, 2, 2, 6, 7, 3, True, True, True),
    (1, 4, 6, 5, 3, 2, 7, True, True, True),  # map smaller than the window
    (2, 4, 6, 5, 3, 2, 7, False, True, True),
    (1, 2, 5, 4, 4, 13, 9, True, True, True),  # odd head dim: Dr != Dc
    (1, 2, 4, 4, 12, 5, 11, False, True, True),
    (2, 1, 4, 3, 8, 8, 7, True, False, True),  # logits="qr": no keys
    (1, 2, 4, 4, 8, 8, 7, False, False, True),
    (1, 2, 4, 4, 7, 9, 3, True, True, False),  # pos != relative: no q.r term
    (1, 2, 4, 4, 7, 9, 3, False, True, False),
    (1, 1, 2, 2, 1, 1, 3, True, True, True),  # single pixel
    (3, 2, 8, 8, 17, 19, 7, True, True, True),  # several vector chunks per row
    (1, 8, 1, 1, 5, 6, 5, True, True, True),  # head dim 1: Dr = 0
]


def _inputs(case, dtype, noncontig=False):  # noqa: ANN001, ANN202
    b, n, d, dv, h, w, kk, mask, has_k, has_rel = case

    def make(c):  # noqa: ANN001, ANN202
        if noncontig:  # channels-last storage, seen through a permuted view
            return torch.randn(b, h, w, n, c, dtype=dtype).permute(0, 3, 4, 1, 2)
        return torch.randn(b, n, c, h, w, dtype=dtype)

    q = make(d).requires_grad_()
    k = make(d).requires_grad_() if has_k else None
    v = make(dv).requires_grad_()
    rr = (torch.randn(kk, d // 2, dtype=dtype) * 0.5).requires_grad_() if has_rel else None
    rc = (torch.randn(kk, d - d // 2, dtype=dtype) * 0.5).requires_grad_() if has_rel else None
    return q, k, v, rr, rc, kk, mask


def _run(fn, args, grad):  # noqa: ANN001, ANN202
    q, k, v, rr, rc, kk, mask = args
    leaves = [x for x in (q, k, v, rr, rc) if x is not None]
    out = fn(q, k, v, rr, rc, kk, mask)
    return [out, *torch.autograd.grad(out, leaves, grad)]


def _assert_close(got, want, rel=1e-4):  # noqa: ANN001, ANN202
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, i
        if b.numel() == 0:
            continue
        scale = max(1.0, b.abs().max().item())
        err = (a.double() - b.double()).abs().max().item()
        assert err <= rel * scale, f"output/grad #{i}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "b{}n{}d{}x{}_{}x{}_k{}_{}{}{}".format(
        *c[:7], "mask" if c[7] else "zeros", "" if c[8] else "_nok", "" if c[9] else "_norel"
    ),
)
def test_backend_matches_reference(backend, case):  # noqa: ANN001
    fn = all_backends()[backend].fn
    args64 = _inputs(case, torch.float64)
    grad = torch.randn_like(
        local_attention_reference(*[a.detach() if torch.is_tensor(a) else a for a in args64])
    )
    want = _run(local_attention_reference, args64, grad)
    args32 = tuple(a.detach().float().requires_grad_() if torch.is_tensor(a) else a for a in args64)
    got = _run(fn, args32, grad.float())
    _assert_close(got, want)
    # float64 in, float64 exactness
    got64 = _run(fn, tuple(a.detach().requires_grad_() if torch.is_tensor(a) else a for a in args64), grad)
    _assert_close(got64, want, rel=1e-10)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mask", [True, False])
def test_noncontiguous_inputs(backend, mask):  # noqa: ANN001
    case = (2, 4, 4, 4, 7, 10, 5, mask, True, True)
    args = _inputs(case, torch.float32, noncontig=True)
    grad = torch.randn(2, 4, 4, 7, 10)
    want = _run(local_attention_reference, args, grad)
    args2 = tuple(a.detach().requires_grad_() if torch.is_tensor(a) else a for a in args)
    _assert_close(_run(all_backends()[backend].fn, args2, grad), want)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("batch", [1, 3])
def test_channel_slices_of_a_fused_projection(backend, batch):  # noqa: ANN001
    """q, k, v as channel slices of one [B, 3C, H, W] tensor (the layer's fused q/k/v conv):
    batch-strided, read in place by cpu_fused."""
    n, d, h, w = 2, 4, 6, 9
    qkv = torch.randn(batch, 3 * n * d, h, w, dtype=torch.float64, requires_grad=True)
    q, k, v = (t.view(batch, n, d, h, w) for t in qkv.split(n * d, dim=1))
    rr = torch.randn(5, d // 2, dtype=torch.float64, requires_grad=True)
    rc = torch.randn(5, d - d // 2, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(batch, n, d, h, w, dtype=torch.float64)
    want = _run(local_attention_reference, (q, k, v, rr, rc, 5, True), grad)
    got = _run(all_backends()[backend].fn, (q, k, v, rr, rc, 5, True), grad)
    _assert_close(got, want, rel=1e-10)


@pytest.mark.parametrize("backend", FAST)
def test_expanded_keys_and_bf16(backend):  # noqa: ANN001
    """Absolute-position keys arrive as an expanded view; bf16 runs (computed in fp32)."""
    q = torch.randn(2, 2, 4, 6, 6)
    k = torch.randn(1, 1, 4, 6, 6).expand(2, 2, -1, -1, -1)
    v = torch.randn(2, 2, 4, 6, 6)
    want = local_attention_reference(q, k, v, None, None, 3, True)
    got = all_backends()[backend].fn(q, k, v, None, None, 3, True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    qb, kb, vb = (x.bfloat16().requires_grad_() for x in (q, k.contiguous(), v))
    out = all_backends()[backend].fn(qb, kb, vb, None, None, 3, True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert qb.grad.dtype == torch.bfloat16 and kb.grad is not None and vb.grad is not None
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_cpu_fused_gradcheck():
    if "cpu_fused" not in FAST:
        pytest.skip("cpu_fused not available")
    fn = all_backends()["cpu_fused"].fn
    q, k, v = (torch.randn(1, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rr = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    rc = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    for mask in (True, False):
        assert torch.autograd.gradcheck(lambda *a: fn(*a, 3, mask), (q, k, v, rr, rc))  # noqa: B023


def test_registry_and_auto():
    names = available_backends()
    assert names[0] == "auto" and "reference" in names and "shift" in names
    if "cpu_fused" in available_backends("cpu"):
        assert resolve_backend("auto", "cpu").name == "cpu_fused"
    assert resolve_backend("auto", "cuda").name in available_backends("cuda")


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_flops_do_not_depend_on_backend(backend):  # noqa: ANN001
    from torch.utils.flop_counter import FlopCounterMode

    from sasa_bench.kernels import counting_flops

    q = k = v = torch.randn(1, 2, 4, 6, 6)
    rr, rc = torch.randn(5, 2), torch.randn(5, 2)
    with counting_flops(), FlopCounterMode(display=False) as fc:
        local_attention(q, k, v, rr, rc, 5, True, backend=backend)
    assert fc.get_total_flops() == 2 * 1 * 2 * 36 * 25 * (4 + 4 + 4)


def test_cpu_fused_falls_back_with_one_warning(monkeypatch):  # noqa: ANN001
    from sasa_bench.kernels import cpp_build

    monkeypatch.setattr(cpp_build, "_EXTENSIONS", {})
    monkeypatch.setenv("CXX", os.path.join(os.sep, "nonexistent", "c++"))
    assert not cpu_fused_mod.is_available()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = k = v = torch.randn(1, 1, 2, 4, 4)
        out = cpu_fused_mod.local_attention_cpu_fused(q, k, v, None, None, 3, True)
        cpu_fused_mod.local_attention_cpu_fused(q, k, v, None, None, 3, True)
        # the op itself stays exact without the kernel (its portable default kernel)
        op_out = torch.ops.sasa.local_attention(q, k, v, None, None, 3, True)[0]
    msgs = [str(w.message) for w in caught if "unavailable" in str(w.message)]
    torch.testing.assert_close(op_out, local_attention_reference(q, k, v, None, None, 3, True))
    assert len(msgs) == 1 and "\n" not in msgs[0]
    torch.testing.assert_close(out, local_attention_reference(q, k, v, None, None, 3, True))
    assert resolve_backend("auto", "cpu").name != "cpu_fused"


_TRITON_SCRIPT = r"""
import torch
from sasa_bench.kernels import triton_fused as tf
from sasa_bench.kernels.reference import local_attention_reference as ref
assert tf.INTERPRET and tf.is_available()
torch.manual_seed(0)
cases = [(2, 2, 4, 9, 11, 5, True, True, True), (1, 2, 6, 3, 2, 7, False, True, True),
         (1, 2, 4, 6, 5, 3, True, False, True), (1, 2, 4, 6, 5, 3, False, True, False),
         (1, 1, 3, 4, 4, 1, True, True, True)]
for b, n, d, h, w, kk, mask, has_k, has_rel in cases:
    q = torch.randn(b, n, d, h, w, requires_grad=True)
    k = torch.randn(b, n, d, h, w, requires_grad=True) if has_k else None
    v = torch.randn(b, n, d + 1, h, w, requires_grad=True)
    rr = torch.randn(kk, d // 2, requires_grad=True) if has_rel else None
    rc = torch.randn(kk, d - d // 2, requires_grad=True) if has_rel else None
    leaves = [x for x in (q, k, v, rr, rc) if x is not None]
    g = torch.randn(b, n, d + 1, h, w)
    o1 = ref(q, k, v, rr, rc, kk, mask)
    o2 = tf.local_attention_triton(q, k, v, rr, rc, kk, mask)
    for a, c in zip([o1, *torch.autograd.grad(o1, leaves, g)], [o2, *torch.autograd.grad(o2, leaves, g)]):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4 * max(1.0, a.abs().max().item()))
assert tf.self_check("cpu") is None  # the first-use check that guards the kernel on each GPU
print("ok")
"""


@pytest.mark.slow  # ~25 s: Triton's interpreter runs the kernel in Python
def test_triton_kernel_in_interpreter():
    """The GPU kernel, run by Triton's CPU interpreter (no GPU needed), equals the reference."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "shift"])
@pytest.mark.parametrize("case", CASES[:8])
def test_gpu_backend_matches_reference(backend, case):  # noqa: ANN001
    fn = all_backends()[backend].fn
    args = tuple(
        a.detach().cuda().requires_grad_() if torch.is_tensor(a) else a for a in _inputs(case, torch.float32)
    )
    grad = torch.randn_like(
        local_attention_reference(*[a.detach() if torch.is_tensor(a) else a for a in args])
    )
    want = _run(local_attention_reference, args, grad)
    args2 = tuple(a.detach().requires_grad_() if torch.is_tensor(a) else a for a in args)
    _assert_close(_run(fn, args2, grad), want)


def test_cpp_kernels_build_where_a_compiler_exists():
    """The fast-path tests skip a kernel that is unavailable; this one makes a broken build fail
    loudly wherever a compiler exists (otherwise the fallback would hide it)."""
    import shutil

    from sasa_bench.hardware import kernel_isa
    from sasa_bench.kernels import cpp_build

    if shutil.which(cpp_build._compiler()) is None:
        pytest.skip("no C++ compiler on PATH")
    ext = cpp_build.extension()
    assert ext.load() is not None, f"the C++ kernels failed to build: {ext.failed}"
    assert ext.module.isa() == kernel_isa()


# --- every ISA path this host can run, against the reference (forward and every gradient) -----


def _isa_params():  # noqa: ANN202
    from sasa_bench.hardware import KERNEL_ISAS, kernel_isa, kernel_isa_supported

    try:
        host = kernel_isa()
    except Exception:  # noqa: BLE001 - an invalid SASA_BENCH_CPU_ISA: every variant is "other"
        host = None
    out = []
    for isa in KERNEL_ISAS:
        why = kernel_isa_supported(isa)
        marks = [pytest.mark.skipif(why is not None, reason=f"{isa} cannot run here: {why}")]
        if isa != host:  # another full build (~1-2 min on 2 cores)
            marks.append(pytest.mark.slow)
        out.append(pytest.param(isa, marks=marks, id=isa))
    return out


@pytest.mark.parametrize("isa", _isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_isa_variant_matches_reference(isa, dtype):  # noqa: ANN001
    """Each ISA build of the C++ kernel (AVX-512 16 lanes, AVX2 8 lanes, portable 4 lanes; lane
    tails and chunk mixes differ) computes the reference operator over the option matrix."""
    from sasa_bench.kernels import cpp_build

    module = cpp_build.load(isa)
    assert module is not None, cpp_build.extension(isa).failed
    assert module.isa() == isa
    for case in CASES:
        args64 = _inputs(case, torch.float64)
        q, k, v, rr, rc, kk, mask = args64
        grad = torch.randn(q.shape[0], q.shape[1], v.shape[2], *q.shape[3:], dtype=torch.float64)
        want = _run(local_attention_reference, args64, grad)
        q2, k2, v2, rr2, rc2 = (None if t is None else t.detach().to(dtype) for t in (q, k, v, rr, rc))
        out, lse = cpu_fused_mod.forward(module, q2, k2, v2, rr2, rc2, kk, mask)
        grads = cpu_fused_mod.backward(module, grad.to(dtype), q2, k2, v2, rr2, rc2, lse, kk, mask)
        _assert_close([out, *(g for g in grads if g is not None)], want, 1e-4 if dtype == torch.float32 else 1e-10)


def _stem_reference(x, w, rel, vmap, heads):  # noqa: ANN001, ANN202
    """Block attention of the stem, written independently of the layer and the kernel:
    x [B,Ci,H,W], w [16 (position), O, Ci] (q, k and, without vmap, v rows), rel [16 (query),
    16 (key), D], vmap [B,C,H,W] or None -> [B,C,H,W]."""
    import torch.nn.functional as F

    b, ci, h, wd = x.shape
    hb, wb, d = h // 4, wd // 4, rel.shape[-1]
    c = d * heads
    proj = torch.einsum("bcpyz,poc->bopyz", F.pixel_unshuffle(x, 4).view(b, ci, 16, hb, wb), w)
    v = proj[:, 2 * c :] if vmap is None else F.pixel_unshuffle(vmap, 4).view(b, c, 16, hb, wb)
    q, k, v = (t.reshape(b, heads, d, 16, hb, wb) for t in (proj[:, :c], proj[:, c : 2 * c], v))
    logits = torch.einsum("bndpyz,bndjyz->bnpjyz", q, k) + torch.einsum("bndpyz,pjd->bnpjyz", q, rel)
    out = torch.einsum("bnpjyz,bndjyz->bndpyz", torch.softmax(logits, dim=3), v)
    return F.pixel_shuffle(out.reshape(b, c * 16, hb, wb), 4)


@pytest.mark.parametrize("isa", _isa_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_vmap", [False, True], ids=["mixture-values", "value-map"])
def test_isa_variant_stem_matches_reference(isa, dtype, with_vmap):  # noqa: ANN001
    """Each ISA build of the stem kernel (16-position rows as 1, 2 or 4 registers; block loads
    and stores by shuffles) against an independent float64 formulation: forward, the pooled
    inference forward (BN affine + 4x4 max-pool), and every gradient."""
    from sasa_bench.kernels import cpp_build, stem_cpu

    module = cpp_build.load(isa)
    assert module is not None, cpp_build.extension(isa).failed
    torch.manual_seed(0)
    b, ci, h, wd, heads, d = 2, 3, 8, 12, 2, 6
    c = heads * d
    x = torch.randn(b, ci, h, wd, dtype=torch.float64, requires_grad=True)
    qk = torch.randn(1, 2 * c, ci, dtype=torch.float64).expand(16, -1, -1)  # position-independent q, k
    vrows = [] if with_vmap else [torch.randn(16, c, ci, dtype=torch.float64)]
    w = torch.cat([qk, *vrows], dim=1).requires_grad_()
    rel = torch.randn(16, 16, d, dtype=torch.float64, requires_grad=True)
    vmap = torch.randn(b, c, h, wd, dtype=torch.float64, requires_grad=True) if with_vmap else None
    gy = torch.randn(b, c, h, wd, dtype=torch.float64)
    want = _stem_reference(x, w, rel, vmap, heads)
    leaves = [x, w, rel] + ([vmap] if with_vmap else [])
    want_grads = torch.autograd.grad(want, leaves, gy)
    scale, shift = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    want_pooled = torch.nn.functional.max_pool2d(want * scale[:, None, None] + shift[:, None, None], 4)

    def cast(t):  # noqa: ANN001, ANN202
        return t.detach().to(dtype).contiguous()

    xt, wt, rt = cast(x), cast(w.permute(1, 2, 0)), cast(rel.permute(1, 2, 0))  # kernel layouts
    e = xt.new_empty(0)
    vt = cast(vmap) if with_vmap else e
    folded = stem_cpu._folded(wt, rt, heads)
    y = module.stem_forward(xt, *folded, vt, heads, c, e, e)
    pooled = module.stem_forward(xt, *folded, vt, heads, c, cast(scale), cast(shift))
    gx, gw, gr, gv = module.stem_backward(xt, wt, rt, vt, cast(gy), heads)
    got = [y, pooled, gx, gw.permute(2, 0, 1), gr.permute(2, 0, 1)] + ([gv] if with_vmap else [])
    ref = [want, want_pooled, *want_grads]
    _assert_close(got, [t.detach() for t in ref], 1e-4 if dtype == torch.float32 else 1e-10)


def test_kernel_input_checks():
    """Every C++ entry point rejects malformed inputs with a clear error, not a crash."""
    from sasa_bench.kernels import cpp_build

    module = cpp_build.load()
    if module is None:
        pytest.skip("C++ kernels unavailable")
    q = torch.randn(1, 1, 2, 4, 4)
    e = q.new_empty(0)
    with pytest.raises(RuntimeError, match="odd"):
        module.attention_forward(q, q, q, e, e, 4, True, False, True)
    with pytest.raises(RuntimeError, match="k must have q's shape"):
        module.attention_forward(q, q[:, :, :1], q, e, e, 3, True, False, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        module.attention_forward(q.half(), q.half(), q.half(), e, e, 3, True, False, True)
    with pytest.raises(RuntimeError, match="lse"):
        module.attention_backward(q, q, q, q, e, e, q, 3, True, False, True)
    with pytest.raises(RuntimeError, match="multiples of 4"):
        module.stem_forward(torch.randn(1, 3, 6, 8), e, e, e, e, 1, 4, e, e)


# --- the torch.library ops ---------------------------------------------------------------------


@pytest.mark.parametrize("has_k,has_rel,mask", [(True, True, True), (False, True, False), (True, False, True)])
def test_opcheck_local_attention(has_k, has_rel, mask):  # noqa: ANN001
    """Schema, fake kernel, autograd registration and AOT dispatch of sasa::local_attention."""
    q = torch.randn(2, 2, 4, 5, 6, requires_grad=True)
    k = torch.randn(2, 2, 4, 5, 6, requires_grad=True) if has_k else None
    v = torch.randn(2, 2, 3, 5, 6, requires_grad=True)
    rr = torch.randn(3, 2, requires_grad=True) if has_rel else None
    rc = torch.randn(3, 2, requires_grad=True) if has_rel else None
    torch.library.opcheck(torch.ops.sasa.local_attention.default, (q, k, v, rr, rc, 3, mask))
    g = torch.randn(2, 2, 3, 5, 6)
    out, lse = torch.ops.sasa.local_attention(q, k, v, rr, rc, 3, mask)
    torch.library.opcheck(
        torch.ops.sasa.local_attention_backward.default,
        (g, q.detach(), k.detach() if has_k else None, v.detach(), rr.detach() if has_rel else None,
         rc.detach() if has_rel else None, out.detach(), lse, 3, mask),
    )  # fmt: skip


@pytest.mark.slow  # ~12 s: flex_attention's CPU path compiles
def test_flex_forward_matches_reference_on_cpu():
    """The flex backend's block mask / score_mod formulation (its forward runs on the CPU; flex
    has no CPU backward, so gradients are checked by `make gpu-check` on a GPU)."""
    from sasa_bench.kernels import flex

    if not flex.is_available():
        pytest.skip("this torch has no torch.nn.attention.flex_attention")
    for case in CASES:
        q, k, v, rr, rc, kk, mask = (a.detach() if torch.is_tensor(a) else a for a in _inputs(case, torch.float32))
        want = local_attention_reference(q, k, v, rr, rc, kk, mask)
        _assert_close([flex.local_attention_flex(q, k, v, rr, rc, kk, mask)], [want])


def test_triton_self_check_rejects_wrong_or_failing_kernels(monkeypatch):  # noqa: ANN001
    """The first-use check on a GPU catches a kernel that is wrong (forward or gradient) or that
    fails, whatever the hardware; here the kernel is replaced by faulty stand-ins on the CPU."""
    from sasa_bench.kernels import triton_fused as tf

    def off_by_a_bit(*args):  # noqa: ANN002, ANN202
        return local_attention_reference(*args) + 0.01

    monkeypatch.setattr(tf._TritonAttention, "apply", off_by_a_bit)
    assert "mismatch" in tf.self_check("cpu")

    def broken(*args):  # noqa: ANN002, ANN202
        raise RuntimeError("PTX assembly failed\nptxas fatal")

    monkeypatch.setattr(tf._TritonAttention, "apply", broken)
    assert tf.self_check("cpu") == "RuntimeError: ptxas fatal"

    monkeypatch.setattr(tf._TritonAttention, "apply", local_attention_reference)
    assert tf.self_check("cpu") is None


def test_backend_that_runs_reports_the_fallback_after_a_failed_build(monkeypatch, tmp_path):  # noqa: ANN001
    """What latency / bench-layer record: resolved after the lazy build, so a build that fails
    (a compiler that exists but fails, an empty extension cache) reports ``shift`` (what then
    runs), not ``cpu_fused``; the build announces itself first."""
    import shutil

    from sasa_bench.kernels import cpp_build
    from sasa_bench.kernels.registry import backend_that_runs

    if shutil.which("false") is None:
        pytest.skip("no `false` command")
    monkeypatch.setattr(cpp_build, "_EXTENSIONS", {})
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    heard: list[str] = []
    monkeypatch.setattr(cpp_build, "BUILD_LISTENERS", [heard.append])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backend_that_runs("auto", "cpu") == "shift"
    assert len(heard) == 1 and heard[0].startswith(cpp_build.BUILD_MESSAGE)
    assert backend_that_runs("reference", "cpu") == "reference"
