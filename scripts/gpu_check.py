#!/usr/bin/env python3
"""`make gpu-check`: what only a CUDA GPU can tell, in one run.

1. Every attention backend that runs on CUDA (triton, flex, shift, and auto) against the
   reference on the GPU: forward and every gradient, over the option matrix (borders, no keys,
   no relative term, odd head dims, k = 1 ... 11, maps smaller than the window).
2. ``sasa-bench latency`` of sasa_resnet50 and sasa_resnet50_convstem against resnet50, fp32 and
   bf16 (channels-last), inference and train, each interleaved with its baseline.

Results go to ``--out`` (default results/gpu-check): ``backends.json`` and one latency JSON per
configuration. Without a GPU it says so on stderr and exits 0 (nothing to check). Exit status 1
if any backend disagrees with the reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# (batch, heads, head_dim, value_dim, H, W, k, mask_border, has_k, has_rel)
CASES = [
    (2, 2, 8, 8, 9, 11, 5, True, True, True),
    (2, 2, 8, 8, 9, 11, 5, False, True, True),
    (1, 1, 3, 3, 5, 5, 1, True, True, True),
    (1, 4, 6, 5, 3, 2, 7, True, True, True),
    (1, 2, 5, 4, 4, 13, 9, True, True, True),
    (1, 2, 4, 4, 12, 5, 11, False, True, True),
    (2, 1, 4, 3, 8, 8, 7, True, False, True),
    (1, 2, 4, 4, 8, 8, 7, False, False, True),
    (1, 2, 4, 4, 7, 9, 3, True, True, False),
    (2, 8, 16, 16, 28, 28, 7, True, True, True),
]
MODELS = ("sasa_resnet50", "sasa_resnet50_convstem")


def check_backends(device: str) -> list[dict]:
    import torch

    from sasa_bench.kernels import available_backends
    from sasa_bench.kernels.reference import local_attention_reference
    from sasa_bench.kernels.registry import all_backends, resolve_backend

    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in available_backends("cuda"):
        ran = resolve_backend(name, "cuda").name
        for case in CASES:
            b, n, d, dv, h, w, kk, mask, has_k, has_rel = case

            def make(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, generator=gen).to(device).requires_grad_()

            q, v = make(b, n, d, h, w), make(b, n, dv, h, w)
            k = make(b, n, d, h, w) if has_k else None
            rr, rc = (make(kk, d // 2), make(kk, d - d // 2)) if has_rel else (None, None)
            leaves = [x for x in (q, k, v, rr, rc) if x is not None]
            g = torch.randn(b, n, dv, h, w, generator=gen).to(device)
            row = {"backend": name, "ran": ran, "case": list(case)}
            try:
                want = local_attention_reference(q, k, v, rr, rc, kk, mask)
                got = all_backends()[ran].fn(q, k, v, rr, rc, kk, mask)
                pairs = zip([want, *torch.autograd.grad(want, leaves, g)], [got, *torch.autograd.grad(got, leaves, g)], strict=True)
                errs = [((a - c).abs().max() / max(1.0, a.abs().max().item())).item() for a, c in pairs]
                row.update(max_rel_err=max(errs), ok=max(errs) <= 1e-3)
            except Exception as e:  # noqa: BLE001 - recorded, reported, exit 1
                row.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}", ok=False)
            rows.append(row)
            print(f"{name:>9} ({ran}) {case}: {'ok' if row['ok'] else 'FAIL'} {row.get('max_rel_err', row.get('error'))}",
                  file=sys.stderr)  # fmt: skip
    return rows


def latency_runs(out: Path) -> None:
    exe = [sys.executable, "-m", "sasa_bench"]
    for model in MODELS:
        for precision in ("fp32", "bf16"):
            for mode in ("inference", "train"):
                name = f"{model}_vs_resnet50_{precision}_channels_last_{mode}.json"
                cmd = [*exe, "latency", "--model", model, "--vs", "resnet50", "--device", "cuda", "--batch-size", "64",
                       "--precision", precision, "--channels-last", "--mode", mode, "--format", "json"]  # fmt: skip
                print("+", " ".join(cmd[2:]), file=sys.stderr)
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"  failed ({res.returncode}): {res.stderr.strip()[-500:]}", file=sys.stderr)
                    continue
                (out / name).write_text(res.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu-check"))
    ap.add_argument("--no-latency", action="store_true", help="only the backend checks")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing was checked", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    from sasa_bench.hardware import host_info

    rows = check_backends("cuda")
    info = host_info("cuda")
    tmp = args.out / "backends.json.tmp"
    tmp.write_text(json.dumps({"host": info, "checks": rows}, indent=2))
    tmp.replace(args.out / "backends.json")
    bad = [r for r in rows if not r["ok"]]
    print(f"gpu-check: {len(rows) - len(bad)}/{len(rows)} backend checks agree with the reference on {info['gpu']}",
          file=sys.stderr)  # fmt: skip
    if not args.no_latency:
        latency_runs(args.out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
