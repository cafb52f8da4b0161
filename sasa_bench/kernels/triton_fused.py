"""``triton``: a fused local-attention kernel for the GPU, written in Triton.

One program handles a block of ``BLOCK_M`` pixels of one (image, head); it loads their queries
once and walks the K*K window offsets with an online (flash-attention style) softmax, so neither
the logits nor any window copy ever reach memory: forward memory is the output plus a
log-sum-exp per pixel. Backward recomputes the logits from q, k and the saved log-sum-exp,
accumulates dq in registers and adds dk/dv into their (shifted) pixels with atomics; the
embeddings' gradients come from per-pixel row/column sums of dS, reduced by one einsum.

Computation is in fp32 whatever the input dtype (bf16/fp16 inputs are loaded and upcast).

Testing without a GPU: with ``TRITON_INTERPRET=1`` set before this module is imported, Triton
runs the same kernels on CPU tensors (slowly); ``tests/test_kernels.py`` does that on small
shapes. Where Triton or CUDA is missing the backend is unavailable and ``auto`` picks ``shift``;
if the kernel fails to compile at run time, one warning is printed and ``shift`` runs instead.

First use on each CUDA device runs :func:`self_check`: a few small cases (every option, forward and
all gradients) against the reference on that device. A mismatch or an error marks the backend
failed (one warning) and ``shift`` runs instead, so a GPU/Triton combination this kernel was
never tried on cannot silently return wrong numbers. It costs well under a second, once.
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    _HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FAILED: str | None = None
_CHECKED: set[str] = set()  # devices where self_check passed
NEG = -1.0e30  # "masked" logit: exp(NEG - m) == 0 for any real m, and no inf - inf NaNs


def is_available() -> bool:
    return _HAVE_TRITON and _FAILED is None and (torch.cuda.is_available() or INTERPRET)


if _HAVE_TRITON:

    @triton.jit
    def _logit(q, kt, rr_t, rc_u, ok, HAS_K: tl.constexpr, HAS_REL: tl.constexpr, MASK: tl.constexpr):
        s = tl.zeros([q.shape[0]], dtype=tl.float32)
        if HAS_K:
            s += tl.sum(q * kt, 1)
        if HAS_REL:
            s += tl.sum(q * (rr_t[None, :] + rc_u[None, :]), 1)
        if MASK:
            s = tl.where(ok, s, NEG)
        return s

    @triton.jit
    def _tile(PTR, base, pix, chan, pix_ok, chan_ok, HW):
        """[pixels, channels] tile in fp32 of a [C, H*W] plane at PTR + base (0 where masked)."""
        t = tl.load(PTR + base + chan[None, :] * HW + pix[:, None], mask=pix_ok[:, None] & chan_ok[None, :], other=0.0)
        return t.to(tl.float32)

    @triton.jit
    def _rel_row(RR, t, d, DR):
        """Row offset t's embedding, in the first DR channels of a D-vector."""
        return tl.load(RR + t * DR + d, mask=d < DR, other=0.0).to(tl.float32)

    @triton.jit
    def _rel_col(RC, u, d, D, DR):
        """Column offset u's embedding, in channels DR..D-1 of a D-vector."""
        return tl.load(RC + u * (D - DR) + (d - DR), mask=(d >= DR) & (d < D), other=0.0).to(tl.float32)

    @triton.jit
    def _fwd_kernel(
        Q, Kt, V, RR, RC, Out, LSE,
        H, W, D, DV, DR,
        K: tl.constexpr, HAS_K: tl.constexpr, HAS_REL: tl.constexpr, MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        bn = tl.program_id(1).to(tl.int64)
        R: tl.constexpr = K // 2
        HW = H * W
        p = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        pin = p < HW
        i = p // W
        j = p % W
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        e = tl.arange(0, BLOCK_DV)
        em = e < DV
        q = _tile(Q, bn * D * HW, p, d, pin, dm, HW)
        m = tl.full([BLOCK_M], NEG, tl.float32)
        denom = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        rr_t = tl.zeros([BLOCK_D], tl.float32)
        rc_u = tl.zeros([BLOCK_D], tl.float32)
        kt = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for t in range(K):
            ii = i + t - R
            row_ok = (ii >= 0) & (ii < H) & pin
            if HAS_REL:
                rr_t = _rel_row(RR, t, d, DR)
            for u in range(K):
                jj = j + u - R
                ok = row_ok & (jj >= 0) & (jj < W)
                src = ii * W + jj
                if HAS_K:
                    kt = _tile(Kt, bn * D * HW, src, d, ok, dm, HW)
                if HAS_REL:
                    rc_u = _rel_col(RC, u, d, D, DR)
                s = _logit(q, kt, rr_t, rc_u, ok, HAS_K, HAS_REL, MASK)
                m_new = tl.maximum(m, s)
                alpha = tl.exp(m - m_new)
                pe = tl.exp(s - m_new)
                vt = _tile(V, bn * DV * HW, src, e, ok, em, HW)
                acc = acc * alpha[:, None] + pe[:, None] * vt
                denom = denom * alpha + pe
                m = m_new
        out = acc / denom[:, None]
        tl.store(
            Out + bn * DV * HW + e[None, :] * HW + p[:, None],
            out.to(Out.dtype.element_ty),
            mask=pin[:, None] & em[None, :],
        )
        tl.store(LSE + bn * HW + p, m + tl.log(denom), mask=pin)

    @triton.jit
    def _bwd_kernel(
        Q, Kt, V, RR, RC, G, LSE, DELTA, DQ, DK, DVv, RS, CS,
        H, W, D, DV, DR,
        K: tl.constexpr, HAS_K: tl.constexpr, HAS_REL: tl.constexpr, MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        bn = tl.program_id(1).to(tl.int64)
        R: tl.constexpr = K // 2
        HW = H * W
        p = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        pin = p < HW
        i = p // W
        j = p % W
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        e = tl.arange(0, BLOCK_DV)
        em = e < DV
        q = _tile(Q, bn * D * HW, p, d, pin, dm, HW)
        g = _tile(G, bn * DV * HW, p, e, pin, em, HW)
        lse = tl.load(LSE + bn * HW + p, mask=pin, other=0.0)
        delta = tl.load(DELTA + bn * HW + p, mask=pin, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        rr_t = tl.zeros([BLOCK_D], tl.float32)
        rc_u = tl.zeros([BLOCK_D], tl.float32)
        kt = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for t in range(K):
            ii = i + t - R
            row_ok = (ii >= 0) & (ii < H) & pin
            if HAS_REL:
                rr_t = _rel_row(RR, t, d, DR)
            rs = tl.zeros([BLOCK_M], tl.float32)
            for u in range(K):
                jj = j + u - R
                ok = row_ok & (jj >= 0) & (jj < W)
                src = ii * W + jj
                if HAS_K:
                    kt = _tile(Kt, bn * D * HW, src, d, ok, dm, HW)
                if HAS_REL:
                    rc_u = _rel_col(RC, u, d, D, DR)
                s = _logit(q, kt, rr_t, rc_u, ok, HAS_K, HAS_REL, MASK)
                pr = tl.where(pin, tl.exp(s - lse), 0.0)
                vt = _tile(V, bn * DV * HW, src, e, ok, em, HW)
                dp = tl.sum(g * vt, 1)
                ds = pr * (dp - delta)
                dq += ds[:, None] * (kt + rr_t[None, :] + rc_u[None, :])
                if HAS_REL:
                    rs += ds
                    cptr = CS + (bn * K + u) * HW + p
                    tl.store(cptr, tl.load(cptr, mask=pin, other=0.0) + ds, mask=pin)
                tl.atomic_add(
                    DVv + bn * DV * HW + e[None, :] * HW + src[:, None],
                    pr[:, None] * g,
                    mask=ok[:, None] & em[None, :],
                )
                if HAS_K:
                    tl.atomic_add(
                        DK + bn * D * HW + d[None, :] * HW + src[:, None],
                        ds[:, None] * q,
                        mask=ok[:, None] & dm[None, :],
                    )
            if HAS_REL:
                tl.store(RS + (bn * K + t) * HW + p, rs, mask=pin)
        tl.store(DQ + bn * D * HW + d[None, :] * HW + p[:, None], dq, mask=pin[:, None] & dm[None, :])


def _blocks(d: int, dv: int) -> tuple[int, int, int]:
    bd, bdv = triton.next_power_of_2(max(d, 1)), triton.next_power_of_2(max(dv, 1))
    bm = 64 if max(bd, bdv) <= 32 else 32
    return bm, bd, bdv


def _prepared(q, k, v, rel_row, rel_col):  # noqa: ANN001, ANN202
    """The kernels' operands: contiguous q, k (q itself as a dummy), v; fp32 embeddings."""
    has_k, has_rel = k is not None, rel_row is not None
    q, v = q.contiguous(), v.contiguous()
    kc = k.contiguous() if has_k else q
    rr = rel_row.float().contiguous() if has_rel else q.new_zeros(1, dtype=torch.float32)
    rc = rel_col.float().contiguous() if has_rel else q.new_zeros(1, dtype=torch.float32)
    dr = rel_row.shape[1] if has_rel else 0
    return q, kc, v, rr, rc, dr


def triton_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN201
    """(out in v's dtype, lse fp32 [B,N,H,W]): the CUDA kernel of ``sasa::local_attention``."""
    b, n, d, h, w = q.shape
    dv = v.shape[2]
    has_k, has_rel = k is not None, rel_row is not None
    q, kc, v, rr, rc, dr = _prepared(q, k, v, rel_row, rel_col)
    out = torch.empty(b, n, dv, h, w, device=q.device, dtype=v.dtype)
    lse = torch.empty(b, n, h, w, device=q.device, dtype=torch.float32)
    bm, bd, bdv = _blocks(d, dv)
    grid = (triton.cdiv(h * w, bm), b * n)
    _fwd_kernel[grid](q, kc, v, rr, rc, out, lse, h, w, d, dv, dr, K=kernel_size, HAS_K=has_k,
                      HAS_REL=has_rel, MASK=mask_border, BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv)  # fmt: skip
    return out, lse


def triton_backward(g, q, k, v, rel_row, rel_col, out, lse, kernel_size, mask_border):  # noqa: ANN001, ANN201
    """(dq, dk or None, dv, d_rel_row or None, d_rel_col or None) in the inputs' dtypes."""
    b, n, d, h, w = q.shape
    dv = v.shape[2]
    has_k, has_rel = k is not None, rel_row is not None
    q_dt = q.dtype
    q, kc, v, rr, rc, dr = _prepared(q, k, v, rel_row, rel_col)
    g = g.contiguous()
    lse = lse.float().contiguous()
    delta = (g.float() * out.float()).sum(2).contiguous()  # [B, N, H, W]
    dq = torch.empty(b, n, d, h, w, device=q.device, dtype=torch.float32)
    dk = torch.zeros(b, n, d, h, w, device=q.device, dtype=torch.float32) if has_k else dq
    dvv = torch.zeros(b, n, dv, h, w, device=q.device, dtype=torch.float32)
    kk = kernel_size if has_rel else 1
    rs = torch.zeros(b, n, kk, h, w, device=q.device, dtype=torch.float32)
    cs = torch.zeros(b, n, kk, h, w, device=q.device, dtype=torch.float32)
    bm, bd, bdv = _blocks(d, dv)
    grid = (triton.cdiv(h * w, bm), b * n)
    _bwd_kernel[grid](q, kc, v, rr, rc, g, lse, delta, dq, dk, dvv, rs, cs, h, w, d, dv, dr,
                      K=kernel_size, HAS_K=has_k, HAS_REL=has_rel, MASK=mask_border,
                      BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv)  # fmt: skip
    d_rr = d_rc = None
    if has_rel:
        qf = q.float()
        d_rr = torch.einsum("bnthw,bndhw->td", rs, qf[:, :, :dr]).to(rel_row.dtype)
        d_rc = torch.einsum("bnuhw,bndhw->ud", cs, qf[:, :, dr:]).to(rel_col.dtype)
    return (dq.to(q_dt), dk.to(k.dtype) if has_k else None, dvv.to(v.dtype), d_rr, d_rc)


class _TritonAttention(torch.autograd.Function):
    """The kernels under plain autograd (what :func:`self_check` runs, outside the op)."""

    @staticmethod
    def forward(ctx, q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN205
        out, lse = triton_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border)
        ctx.save_for_backward(q, k, v, rel_row, rel_col, out, lse)
        ctx.meta = (kernel_size, mask_border)
        return out

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        q, k, v, rel_row, rel_col, out, lse = ctx.saved_tensors
        kernel_size, mask_border = ctx.meta
        return (*triton_backward(g, q, k, v, rel_row, rel_col, out, lse, kernel_size, mask_border), None, None)


# (batch, heads, head dim, H, W, k, mask_border, has_k, has_rel): borders, a map smaller than k,
# no keys, no relative term, k = 1
_CHECK_CASES = [(2, 2, 8, 9, 11, 5, True, True, True), (1, 2, 6, 3, 2, 7, False, True, True),
                (1, 2, 4, 6, 5, 3, True, False, True), (1, 2, 4, 6, 5, 3, False, True, False),
                (1, 1, 3, 4, 4, 1, True, True, True)]  # fmt: skip


def self_check(device: torch.device | str) -> str | None:
    """Run the kernel on small cases on ``device`` against the reference (forward and every
    gradient, fp32). Returns None if all agree, else what went wrong (errors included)."""
    from sasa_bench.kernels.reference import local_attention_reference

    gen = torch.Generator().manual_seed(0)
    try:
        for b, n, d, h, w, kk, mask, has_k, has_rel in _CHECK_CASES:
            def make(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, generator=gen).to(device).requires_grad_()

            q, v = make(b, n, d, h, w), make(b, n, d + 1, h, w)
            k = make(b, n, d, h, w) if has_k else None
            rr, rc = (make(kk, d // 2), make(kk, d - d // 2)) if has_rel else (None, None)
            leaves = [x for x in (q, k, v, rr, rc) if x is not None]
            g = torch.randn(b, n, d + 1, h, w, generator=gen).to(device)
            want = local_attention_reference(q, k, v, rr, rc, kk, mask)
            got = _TritonAttention.apply(q, k, v, rr, rc, kk, mask)
            for i, (a, c) in enumerate(zip([want, *torch.autograd.grad(want, leaves, g)],
                                           [got, *torch.autograd.grad(got, leaves, g)], strict=True)):
                scale = max(1.0, a.abs().max().item())
                err = (a - c).abs().max().item()
                if not err <= 1e-3 * scale:  # also catches NaN
                    return f"self-check mismatch (case {(b, n, d, h, w, kk, mask, has_k, has_rel)}, tensor {i}: max error {err:.3g})"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use this kernel here
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[-1] if msg else ''}"
    return None


@torch._dynamo.assume_constant_result
def ready(device: str) -> bool:
    """Triton usable on ``device`` (runs the first-use :func:`self_check` there once); a
    constant to torch.compile."""
    global _FAILED
    if _FAILED is None and _HAVE_TRITON and device.startswith("cuda") and device not in _CHECKED:
        problem = self_check(device)
        if problem is None:
            _CHECKED.add(device)
        else:
            _FAILED = problem
            warnings.warn(f"sasa_bench: backend 'triton' failed its first-use check ({_FAILED}); using 'shift'", stacklevel=2)
    return _FAILED is None and _HAVE_TRITON


def _fail(e: Exception) -> None:
    global _FAILED
    if isinstance(e, torch.cuda.OutOfMemoryError):
        raise e
    msg = str(e).strip().splitlines()
    _FAILED = f"{type(e).__name__}: {msg[-1] if msg else ''}"
    warnings.warn(f"sasa_bench: backend 'triton' failed ({_FAILED}); using 'shift'", stacklevel=3)


if _HAVE_TRITON:
    from sasa_bench.kernels.op import (
        backward_outputs,
        fallback_backward,
        fallback_forward,
        local_attention_op,
    )

    @local_attention_op.register_kernel("cuda")
    def _cuda_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN202
        if _FAILED is None:
            try:
                out, lse = triton_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border)
                return out, (lse.double() if q.dtype == torch.float64 else lse)
            except Exception as e:  # noqa: BLE001 - a compile failure must not kill a benchmark
                _fail(e)
        return fallback_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border)

    @torch.library.register_kernel("sasa::local_attention_backward", "cuda")
    def _cuda_backward(grad, q, k, v, rel_row, rel_col, out, lse, kernel_size, mask_border):  # noqa: ANN001, ANN202
        if _FAILED is None:
            try:
                grads = triton_backward(grad, q, k, v, rel_row, rel_col, out, lse, kernel_size, mask_border)
                return backward_outputs(grads, q, k, v, rel_row, rel_col)
            except Exception as e:  # noqa: BLE001
                _fail(e)
        return fallback_backward(grad, q, k, v, rel_row, rel_col, kernel_size, mask_border)


def local_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    kernel_size: int,
    mask_border: bool = True,
) -> torch.Tensor:
    """Same operator as :func:`~sasa_bench.kernels.reference.local_attention_reference`, through
    the ``sasa::local_attention`` op (its CUDA kernel); ``shift`` where Triton cannot run."""
    if q.is_cuda and ready(str(q.device)):
        return torch.ops.sasa.local_attention(q, k, v, rel_row, rel_col, kernel_size, mask_border)[0]
    if INTERPRET and _HAVE_TRITON and _FAILED is None:  # CPU tensors through Triton's interpreter
        return _TritonAttention.apply(q, k, v, rel_row, rel_col, kernel_size, mask_border)
    from sasa_bench.kernels.shift import local_attention_shift

    return local_attention_shift(q, k, v, rel_row, rel_col, kernel_size, mask_border)
