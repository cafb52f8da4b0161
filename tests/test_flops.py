"""FLOPs and params: Table 1 of the paper, torchvision's ResNet-50, the two counters agreeing,
backend independence and an analytic count of one attention layer.

The paper counts a multiply-add as 2 FLOPs; ``FlopCount.gflops`` is that convention.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from sasa_bench import LocalSelfAttention2d, available_backends, create_model
from sasa_bench.measure.flops import count_flops, macs_fvcore, macs_torch
from sasa_bench.report.paper import TABLE1
from sasa_bench.spec import TABLE1_MODELS

# Params of the two ResNet-38 attention rows: the paper prints 14.1 M, the architecture gives
# 14.17 M. Derivation: the baseline ResNet-38 has 19.63 M params (the paper: 19.6); each replaced
# 3x3 conv of width w loses 9w^2 - 3w^2 = 6w^2 (plus k*w/heads relative embeddings), and
# 6 * sum(w^2) over ResNet-38's [2, 3, 5, 2] blocks = 6 * (2*64^2 + 3*128^2 + 5*256^2 + 2*512^2)
# = 5.46 M, so 19.63 - 5.46 + 0.003 = 14.17 M. The same derivation lands on the paper's ResNet-26
# (10.3) and ResNet-50 (18.0) rows to rounding, so 14.1 looks like the paper's rounding/typo; we
# do not tune the model to it and allow 0.08 M there.
PARAMS_TOL_M = {"sasa_resnet38_convstem": 0.08, "sasa_resnet38": 0.08}


def _gflops_tol(name: str) -> float:
    full_attention = name.startswith("sasa_") and not name.endswith("_convstem")
    return 0.15 if full_attention else 0.1


# 224x224 with both counters takes 7-14 s per model on a 2-core host: the ResNet-26 rows stay in
# the fast suite (they exercise every code path: conv, conv stem + attention, attention stem), the
# deeper ones run with the slow tests (CI runs both).
_FAST_TABLE1 = {"resnet26", "sasa_resnet26_convstem", "sasa_resnet26"}


@pytest.mark.parametrize(
    "name", [n if n in _FAST_TABLE1 else pytest.param(n, marks=pytest.mark.slow) for n in TABLE1_MODELS]
)
def test_table1_params_and_gflops(name: str) -> None:
    paper_gflops, paper_params_m, _ = TABLE1[name]
    c = count_flops(create_model(name), 224, counter="both")  # raises if the counters disagree
    assert abs(c.params / 1e6 - paper_params_m) <= PARAMS_TOL_M.get(name, 0.05), (c.params, paper_params_m)
    assert abs(c.gflops - paper_gflops) <= _gflops_tol(name), (c.gflops, paper_gflops)
    assert c.gflops == pytest.approx(2 * c.gmacs)


def test_resnet38_params_follow_the_derivation() -> None:
    """The derivation in the comment above, checked: no tuning hides in the 0.08 M tolerance."""
    base = sum(p.numel() for p in create_model("resnet38").parameters())
    blocks, widths = (2, 3, 5, 2), (64, 128, 256, 512)
    expected = base + sum(n * (-6 * w * w + 7 * (w // 8)) for n, w in zip(blocks, widths, strict=True))
    got = sum(p.numel() for p in create_model("sasa_resnet38_convstem").parameters())
    assert got == expected
    assert abs(base / 1e6 - 19.6) <= 0.05


@pytest.mark.slow
def test_resnet50_flops_equal_torchvisions() -> None:
    ours = count_flops(create_model("resnet50"), 224, counter="both")
    tv = count_flops(torchvision.models.resnet50(), 224, counter="both")
    assert ours == tv
    assert ours.params == 25_557_032
    assert round(ours.gflops, 1) == 8.2  # the paper's 4.1 G multiply-adds


def test_count_flops_restores_training_mode() -> None:
    model = create_model("resnet26", image_size=32, num_classes=2, width=0.25)
    model.train()
    count_flops(model, 32, counter="torch")
    assert model.training


# pos "none" with logits "qr" has no logit term; the layer rejects it.
POS_LOGITS = [("relative", "qk+qr"), ("relative", "qr"), ("absolute", "qk+qr"), ("absolute", "qr"), ("none", "qk+qr")]


@pytest.mark.parametrize(("pos", "logits"), POS_LOGITS)
def test_counters_agree(pos: str, logits: str) -> None:
    model = create_model("sasa_resnet26", image_size=64, width=0.25, heads=2, pos=pos, logits=logits, num_classes=10)
    model.eval()
    t, f = macs_torch(model, 64), macs_fvcore(model, 64)
    assert t == f
    assert t > 0


def test_flops_do_not_depend_on_the_backend() -> None:
    names = [b for b in available_backends("cpu") if b != "auto"] + ["auto"]
    counts = {
        b: count_flops(create_model("sasa_resnet26", image_size=32, width=0.25, heads=2, backend=b), 32)
        for b in names
    }
    assert len(set(counts.values())) == 1, counts


def test_flops_do_not_depend_on_the_border() -> None:
    a = count_flops(create_model("sasa_resnet26", image_size=32, width=0.25, heads=2, border="mask"), 32)
    b = count_flops(create_model("sasa_resnet26", image_size=32, width=0.25, heads=2, border="zeros"), 32)
    assert a == b


class _Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize(("pos", "logits"), POS_LOGITS)
@pytest.mark.parametrize(("k", "heads", "cout", "size"), [(7, 8, 32, 32), (3, 2, 8, 32), (1, 1, 4, 64)])
def test_single_layer_hand_count(k: int, heads: int, cout: int, size: int, pos: str, logits: str) -> None:
    """Projections: one Cin x Cout matrix per pixel for q, k (unless "qr") and v. Attention, per
    pixel and head, over the k^2 window: a D-dot product for the content term q.k (q.(k + p)
    for absolute positions), one for q.r (relative positions), and a D-weighted sum of values."""
    cin = 3
    layer = LocalSelfAttention2d(cin, cout, kernel_size=k, heads=heads, pos=pos, logits=logits)
    hw = size * size
    d = cout // heads
    n_proj = 3 if logits == "qk+qr" else 2
    content = logits == "qk+qr" or pos == "absolute"
    per_window_pos = d * content + d * (pos == "relative") + d
    expected = n_proj * cin * cout * hw + k * k * hw * per_window_pos * heads
    for counter in ("torch", "fvcore"):
        c = count_flops(_Wrap(layer), size, counter=counter)
        assert c.macs == expected, counter
        assert c.params == sum(p.numel() for p in layer.parameters())


def test_attention_costs_grow_slowly_with_k() -> None:
    """The paper: compute grows slowly with k (the 1x1 convs dominate)."""
    g = {
        k: count_flops(
            create_model("sasa_resnet26_convstem", kernel_size=k, image_size=64, width=0.25, heads=2), 64, "torch"
        ).macs
        for k in (3, 7, 11)
    }
    assert g[3] < g[7] < g[11]
    # only the k^2 (D + D + D) N HW attention term changes with k
    assert (g[11] - g[7]) * (49 - 9) == (g[7] - g[3]) * (121 - 49)
