"""Detection (Table 2): the RetinaNet presets' params and FLOPs against the paper and against the
architecture's arithmetic, the attention FPN/heads against a slow reference, and the spec rules.

Arithmetic of the conv rows (P6 from P5, 90 classes, 6 anchors; see models/detection.py):
ResNet-50 body 23.508 M + FPN (laterals 0.918 M, five 3x3 convs 2.950 M) + heads (eight 3x3
towers 4.721 M, predictors 2305 * 6 * (90 + 4) = 1.300 M) = 33.397 M (paper 33.4).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sasa_bench import create_model
from sasa_bench.cli.app import main
from sasa_bench.errors import SasaError
from sasa_bench.layers.attention import LocalSelfAttention2d
from sasa_bench.measure.flops import count_flops, count_params
from sasa_bench.report.paper import TABLE2
from sasa_bench.spec import TABLE2_MODELS, make_spec

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "SASA.md"
ATTN = "retinanet_sasa_resnet50_attnfpn"

# Documented gap: with every 3x3 conv of the FPN and heads as attention and the added pointwise
# conv as the predictor (our reading of A.3), the attention-FPN rows have 19.98 M params where
# the paper prints 22.0. Every reading of A.3 we tried leaves the paper's pair (22.0 M, 111 B)
# out of reach: the pair needs ~2 M more params than ours at ~5 GFLOPS more, i.e. weights that
# run on few pixels, and no layer of the FPN/heads has that ratio (README, "Object detection").
# The GFLOPS of these rows are within 5%, and the paper's relative claims hold.
PARAMS_TOL_M = {"retinanet_sasa_resnet50_convstem_attnfpn": 2.1, ATTN: 2.1}


def _conv_head_params(a: int, k: int) -> int:
    tower = 8 * (256 * 256 * 9 + 256)
    return tower + (256 * 9 + 1) * a * (k + 4)


def _fpn_params(p6_in: int = 256) -> int:
    lateral = sum(c * 256 + 256 for c in (512, 1024, 2048))
    return lateral + 4 * (256 * 256 * 9 + 256) + (p6_in * 256 * 9 + 256)


@pytest.mark.parametrize("name", TABLE2_MODELS)
def test_table2_params(name: str) -> None:
    m = create_model(name)
    assert abs(count_params(m) / 1e6 - TABLE2[name][1]) <= PARAMS_TOL_M.get(name, 0.1)
    if "attnfpn" not in name:
        body = count_params(m.backbone.body)
        assert count_params(m) == body + _fpn_params() + _conv_head_params(6, 90)


def test_params_do_not_depend_on_input_size_and_options_change_them() -> None:
    base = count_params(create_model("retinanet_resnet50"))
    assert count_params(create_model("retinanet_resnet50", image_size=256)) == base
    # the options are the other readings: 9 anchors, P6 from C5, 91 slots
    assert count_params(create_model("retinanet_resnet50", anchor_scales=3)) - base == (256 * 9 + 1) * 3 * 94
    assert count_params(create_model("retinanet_resnet50", p6_from="c5")) - base == (2048 - 256) * 256 * 9
    assert count_params(create_model("retinanet_resnet50", num_classes=91)) - base == (256 * 9 + 1) * 6


def test_attention_everywhere_has_the_papers_param_saving() -> None:
    conv = count_params(create_model("retinanet_resnet50"))
    for name in ("retinanet_sasa_resnet50_convstem_attnfpn", ATTN):
        assert count_params(create_model(name)) <= 0.70 * conv  # paper: 34% fewer


@pytest.mark.slow
def test_conv_detector_flops_match_the_arithmetic_at_small_size() -> None:
    """The count is the backbone's + FPN + heads computed by hand (no resize, anchors or NMS)."""
    size = 128
    det = count_flops(create_model("retinanet_resnet50", depth=26, width=0.25, image_size=size), size, counter="torch")
    cls = count_flops(create_model("resnet26", width=0.25, image_size=size), size, counter="torch")
    body = cls.macs - 512 * 1000  # no classifier
    px = [(size // s) ** 2 for s in (8, 16, 32, 64, 128)]
    fpn = px[0] * 128 * 256 + px[1] * 256 * 256 + px[2] * 512 * 256 + sum(px) * 256 * 256 * 9
    heads = sum(px) * (8 * 256 * 256 * 9 + 256 * 9 * 6 * 94)
    assert det.macs == body + fpn + heads


@pytest.mark.slow
@pytest.mark.parametrize("name", ["retinanet_resnet50", ATTN])
def test_detector_counters_agree(name: str) -> None:
    count_flops(create_model(name, image_size=128), 128, counter="both")  # raises if they disagree


def test_attention_detector_counts_attention_at_input_resolution() -> None:
    spec = make_spec(ATTN, depth=26, width=0.25, image_size=128, kernel_size=3)
    m = create_model(spec)
    c = count_flops(m, 128, counter="torch")
    # P6/P7 attention runs on P5 (4x4) and P6 (2x2) before pooling: 16 + 4 pixels, not 4 + 1.
    per_px = 3 * 256 * 256 + 9 * 8 * (32 + 32 + 32)
    px = [256, 64, 16, 4, 1]
    fpn = 256 * 128 * 256 + 64 * 256 * 256 + 16 * 512 * 256 + (256 + 64 + 16 + 16 + 4) * per_px
    heads = sum(px) * (10 * per_px + 256 * 6 * 94)
    body = count_flops(create_model("sasa_resnet26", width=0.25, image_size=128, kernel_size=3), 128, counter="torch").macs - 512 * 1000
    assert c.macs == body + fpn + heads


@pytest.mark.slow
@pytest.mark.parametrize("name", TABLE2_MODELS)
def test_table2_gflops_at_640(name: str) -> None:
    c = count_flops(create_model(name), 640, counter="both")
    assert abs(c.gflops - TABLE2[name][0]) <= 0.05 * TABLE2[name][0]


@pytest.mark.slow
def test_attention_everywhere_has_the_papers_flops_saving() -> None:
    conv = count_flops(create_model("retinanet_resnet50"), 640, counter="torch").macs
    attn = count_flops(create_model(ATTN), 640, counter="torch").macs
    assert attn <= 0.65 * conv  # paper: 39% fewer


# --------------------------------------------------------------------------- slow reference


def _shift(t: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t[..., i + dy, j + dx] (zero outside) and where that lies inside the map."""
    h, w = t.shape[-2:]
    out = torch.zeros_like(t)
    ok = torch.zeros(h, w, dtype=torch.bool)
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., yd, xd] = t[..., ys, xs]
    ok[yd, xd] = True
    return out, ok


def _attention(x: torch.Tensor, layer: LocalSelfAttention2d) -> torch.Tensor:
    """The paper's equation, one window offset at a time, from the layer's weights."""
    b, _, h, w = x.shape
    n = layer.heads

    def proj(conv: torch.nn.Conv2d) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x).reshape(b, n, -1, h, w)

    q, k, v = proj(layer.query), proj(layer.key), proj(layer.value)
    row, col = layer.rel.row, layer.rel.col
    r = layer.kernel_size // 2
    logits, values = [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ks, ok = _shift(k, dy, dx)
            vs, _ = _shift(v, dy, dx)
            rel = torch.cat([row[dy + r], col[dx + r]])
            lg = (q * ks).sum(2) + torch.einsum("bndhw,d->bnhw", q, rel)
            logits.append(lg.masked_fill(~ok, float("-inf")))
            values.append(vs)
    attn = torch.softmax(torch.stack(logits), dim=0)
    return sum(a[:, :, None] * vv for a, vv in zip(attn, values, strict=True)).reshape(b, -1, h, w)


def _conv1x1(x: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias)


def _reference_fpn_and_heads(model, c3, c4, c5):
    fpn = model.backbone.fpn
    lat = [_conv1x1(c, fpn.inner_blocks[i][0]) for i, c in enumerate((c3, c4, c5))]
    p5 = lat[2]
    p4 = lat[1] + F.interpolate(p5, size=lat[1].shape[-2:], mode="nearest")
    p3 = lat[0] + F.interpolate(p4, size=lat[0].shape[-2:], mode="nearest")
    outs = [_attention(p, fpn.layer_blocks[i]) for i, p in enumerate((p3, p4, p5))]
    extra = fpn.extra_blocks
    p6 = F.avg_pool2d(_attention(outs[2], extra.p6[0]), 2, 2, ceil_mode=True)
    p7 = F.avg_pool2d(_attention(F.relu(p6), extra.p7[0]), 2, 2, ceil_mode=True)
    levels = [*outs, p6, p7]
    head = model.head

    def run(h_mod, last, per_anchor):
        res = []
        for f in levels:
            h = f
            for layer in h_mod.conv:
                h = F.relu(_attention(h, layer[0]))
            out = _conv1x1(_attention(h, last[0]), last[1])
            n, _, hh, ww = out.shape
            res.append(out.view(n, -1, per_anchor, hh, ww).permute(0, 3, 4, 1, 2).reshape(n, -1, per_anchor))
        return torch.cat(res, 1)

    cls = run(head.classification_head, head.classification_head.cls_logits, model.spec.num_classes)
    box = run(head.regression_head, head.regression_head.bbox_reg, 4)
    return cls, box


def test_attention_fpn_and_heads_match_a_slow_reference() -> None:
    torch.manual_seed(0)
    spec = make_spec(ATTN, depth=26, width=0.25, image_size=128, kernel_size=3, num_classes=5)
    model = create_model(spec).eval()
    with torch.no_grad():
        for m in model.head.modules():  # the 0.01 init makes the outputs ~0: use larger weights
            if isinstance(m, LocalSelfAttention2d):
                m.value.weight.normal_(0, 0.1)
        x = torch.randn(1, 3, 96, 64)  # non-square: P5 3x2, P6 2x1 (ceil), P7 1x1
        b = model.backbone.body
        c3 = b.layer2(b.layer1(b.stem(x)))
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        want = _reference_fpn_and_heads(model, c3, c4, c5)
        got = model.counted()(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5), (g - w).abs().max()


def test_attention_heads_init_and_sharing() -> None:
    m = create_model(ATTN)
    head_attn = [a for a in m.head.modules() if isinstance(a, LocalSelfAttention2d)]
    assert len(head_attn) == 10  # 4 + 1 per head, one set for all levels
    for layer in head_attn:
        assert abs(layer.value.weight.std().item() - 0.01) < 0.001  # A.3: W_V ~ N(0, 0.01)
    fpn_attn = [a for a in m.backbone.fpn.modules() if isinstance(a, LocalSelfAttention2d)]
    assert len(fpn_attn) == 5
    assert all(a.kernel_size == 7 and a.heads == 8 and a.out_channels == 256 for a in head_attn + fpn_attn)
    cls = m.head.classification_head.cls_logits
    assert cls[1].kernel_size == (1, 1) and cls[1].out_channels == 6 * 90
    assert torch.allclose(cls[1].bias, torch.full_like(cls[1].bias, -4.59512), atol=1e-4)  # RetinaNet's prior 0.01


@pytest.mark.slow
def test_detector_runs_torchvisions_train_and_eval_paths() -> None:
    torch.manual_seed(0)
    m = create_model(ATTN, depth=26, width=0.25, image_size=128, kernel_size=3)
    m.transform.min_size, m.transform.max_size = (64,), 64  # a small input keeps the test fast
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = m([torch.rand(3, 128, 128), torch.rand(3, 100, 128)], targets)
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 200, 150)])
    assert out[0]["boxes"].shape[1] == 4


# --------------------------------------------------------------------------- spec, paper, CLI


@pytest.mark.skipif(not PAPER.is_file(), reason=f"the paper's transcription {PAPER} is not here")
def test_table2_matches_the_paper_text() -> None:
    text = PAPER.read_text()
    section = text[text.index("Table 2"):]
    rows = [line for line in section.splitlines() if re.match(r"\| (convolution|attention) \|", line)][:5]
    assert len(rows) == 5
    for name, line in zip(TABLE2_MODELS, rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert tuple(float(c) for c in cells[2:]) == TABLE2[name], name


def test_detection_fields_are_checked_and_absent_from_classifier_keys() -> None:
    assert "detector" not in make_spec("resnet50").to_dict()  # classification result keys unchanged
    assert make_spec("retinanet_resnet50").to_dict()["detector"] == "retinanet"
    with pytest.raises(SasaError, match="only apply to a detector"):
        make_spec("resnet50", fpn="attention")
    with pytest.raises(SasaError, match="unknown fpn"):
        make_spec("retinanet_resnet50", fpn="transformer")
    with pytest.raises(SasaError, match=">= 128"):
        make_spec("retinanet_resnet50", image_size=96)
    assert make_spec(ATTN, kernel_size=5).name == f"{ATTN}[kernel_size=5]"
    assert make_spec("retinanet_resnet50", depth=26).name == "retinanet_resnet26"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.slow
def test_cli_flops_of_a_detector(capsys) -> None:
    code, out, _ = _cli(capsys, "flops", "--model", "retinanet_resnet50", "--depth", "26", "--width", "0.25", "--image-size", "128", "--paper", "-f", "json")
    assert code == 0
    row = json.loads(out)[0]
    assert row["paper_gflops"] is None and row["image_size"] == 128  # not a Table 2 model/size: no paper numbers


@pytest.mark.parametrize(("args", "says"), [
    (["--task", "detection", "--model", "resnet26"], "not a detector"),
    (["--model", "retinanet_resnet50", "--data", "synthetic"], "--task detection"),
    (["--task", "detection", "--backbone-checkpoint", "x.pt", "--task", "classification"], "for --task detection"),
    (["--task", "detection", "--recipe", "short"], "needs --data-dir"),
    (["--task", "detection", "--recipe", "short", "--data", "imagenet", "--data-dir", "."], "unknown detection data"),
])
def test_cli_train_detection_bad_arguments(capsys, tmp_path, args, says) -> None:
    code, _, err = _cli(capsys, "train", *args, "--out", str(tmp_path / "run"), "-q")
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_latency_times_a_detector_in_both_modes() -> None:
    from sasa_bench.measure.latency import LatencyOptions, measure_latency

    spec = make_spec(ATTN, depth=26, width=0.25, image_size=128, kernel_size=3)
    for mode in ("inference", "train"):
        row = measure_latency([spec], LatencyOptions(mode=mode, batch_size=2, warmup=1, iters=1))[0]
        assert row["median_ms"] > 0 and row["image_size"] == 128 and row["mode"] == mode


def test_detection_study_is_table2_and_refuses_training(capsys, tmp_path) -> None:
    from sasa_bench.studies import expand, load_study

    variants = expand(load_study("detection"))
    assert [v.spec.name for v in variants] == TABLE2_MODELS
    for v in variants:
        g, p, m = TABLE2[v.spec.name][:3]
        assert v.paper == {"gflops": g, "params_m": p, "top1": m}  # top1: the study's metric, COCO mAP
        assert v.spec.image_size == 640 and v.vs is not None and v.vs.name == "retinanet_resnet50"
    code, _, err = _cli(capsys, "ablate", "detection", "--train", "short", "--results", str(tmp_path))
    assert code == 2 and "--train none" in err
