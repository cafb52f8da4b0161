"""timm interop: timm:NAME models through flops/latency/studies, our presets inside timm, the peers
study, and the error without timm."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from sasa_bench import create_model, list_models, make_spec  # noqa: E402
from sasa_bench.errors import SasaError  # noqa: E402
from sasa_bench.measure.flops import count_flops  # noqa: E402
from sasa_bench.models import build_model  # noqa: E402


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sasa_bench", *args], capture_output=True, text=True, timeout=timeout)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- timm -> us


def test_timm_resnet50_counts_like_torchvision() -> None:
    """Both counters (they must agree: counter="both") on timm's resnet50 give torchvision's
    ResNet-50: 25,557,032 params, 4.089 GMACs = 8.18 GFLOPS; our resnet50 is the independent reference."""
    spec = make_spec("timm:resnet50")
    assert (spec.name, spec.timm, spec.image_size, spec.num_classes) == ("timm:resnet50", "resnet50", 224, 1000)
    theirs = count_flops(build_model(spec), 224, counter="both")
    ours = count_flops(create_model("resnet50"), 224, counter="both")
    assert theirs.params == ours.params == 25_557_032
    assert theirs.macs == ours.macs
    assert round(theirs.gflops, 2) == 8.18


def test_timm_spec_defaults_overrides_and_rejections() -> None:
    assert make_spec("timm:botnet26t_256").image_size == 256  # timm's pretrained_cfg input size
    s = make_spec("timm:botnet26t_256", image_size=64, num_classes=10, backend="auto")
    assert (s.image_size, s.num_classes, s.name) == (64, 10, "timm:botnet26t_256[image_size=64 num_classes=10]")
    assert not s.uses_attention  # no attention of ours: no backend runs
    assert s.to_dict()["timm"] == "botnet26t_256" and "timm" not in make_spec("resnet50").to_dict()
    with pytest.raises(SasaError, match="only --image-size and --num-classes apply.*--k"):
        make_spec("timm:resnet50", kernel_size=3)
    with pytest.raises(SasaError, match="timm has no model 'resnet5000'"):
        make_spec("timm:resnet5000")


def test_timm_model_that_cannot_run_at_a_size_is_one_line() -> None:
    spec = make_spec("timm:halonet26t", image_size=224)  # 14x14 maps, 8x8 blocks
    with pytest.raises(SasaError, match=r"does not run at 224x224 \(assertion in timm/layers/halo_attn.py"):
        count_flops(build_model(spec), 224, counter="torch")


def test_timm_attention_counts_agree_between_counters() -> None:
    """Fused attention (swin/vit: scaled_dot_product_attention) is counted as explicit matmuls by
    both counters, and the model is left fused afterwards."""
    model = build_model(make_spec("timm:test_vit", image_size=64))
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is not None]
    before = [m.fused_attn for m in fused]
    c = count_flops(model, 64, counter="both")  # raises if the counters disagree
    assert c.macs > 0 and [m.fused_attn for m in fused] == before


def test_cli_flops_and_latency_on_small_timm_models() -> None:
    r = run("flops", "--model", "timm:test_resnet", "--model", "timm:test_byobnet", "--image-size", "64", "-f", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    for row, name in zip(rows, ("test_resnet", "test_byobnet"), strict=True):
        expected = n_params(timm.create_model(name, num_classes=1000))
        assert row["model"] == f"timm:{name}[image_size=64]" and row["params"] == expected and row["gflops"] > 0
    r = run("latency", "--model", "resnet26", "--width", "0.25", "--image-size", "64", "--vs", "timm:test_resnet",
            "--device", "cpu", "--batch-size", "2", "--warmup", "0", "--iters", "1", "-f", "json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["vs_model"] == "timm:test_resnet[image_size=64]" and row["vs_image_size"] == 64
    assert row["vs_params"] == n_params(timm.create_model("test_resnet")) and row["time_ratio"] > 0
    assert row["vs_backend"] is None  # timm's model runs none of our backends


def test_cli_timm_rejects_model_flags_and_lists_models() -> None:
    r = run("flops", "--model", "timm:resnet50", "--heads", "4")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "only --image-size and --num-classes" in r.stderr
    r = run("models", "--timm", "test_res*", "-f", "json")
    assert r.returncode == 0, r.stderr
    assert [x["model"] for x in json.loads(r.stdout)] == ["timm:test_resnet"]


def test_missing_timm_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without timm (the import fails), a timm: name is a SasaError naming the extra to install;
    through the CLI that is one line and exit 2."""
    real_import = builtins.__import__

    def no_timm(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(SasaError, match=r"not installed: pip install 'sasa-bench\[timm\]'"):
        make_spec("timm:resnet50")
    monkeypatch.undo()
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'timm' or name.startswith('timm.'): raise ImportError('no timm')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "from sasa_bench.cli.app import main\n"
        "main(['flops', '--model', 'timm:resnet50'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "sasa-bench: error: timm models need timm, which is not installed: pip install 'sasa-bench[timm]'"


# ----------------------------------------------------------------------------- us -> timm


@pytest.mark.parametrize("name", ["sasa_resnet26", "sasa_resnet26_convstem"])
def test_timm_create_model_builds_exactly_ours(name: str) -> None:
    import sasa_bench  # noqa: F401 - registers the presets (already imported: the hook ran)

    theirs = timm.create_model(name, num_classes=10, image_size=64, width=0.25)
    ours = create_model(name, num_classes=10, image_size=64, width=0.25)
    assert type(theirs) is type(ours) and n_params(theirs) == n_params(ours)
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    # interchangeable both ways: load each into the other and compare outputs
    x = torch.randn(2, 3, 64, 64)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    torch.testing.assert_close(theirs(x), ours(x))
    fresh = timm.create_model(name, num_classes=10, image_size=64, width=0.25).eval()
    fresh.load_state_dict(ours.state_dict())
    torch.testing.assert_close(fresh(x), ours(x))
    # what timm's data pipeline and benchmark read
    cfg = timm.data.resolve_data_config(model=theirs)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bilinear"
    assert theirs.pretrained_cfg["url"] == "" and not theirs.pretrained_cfg.get("hf_hub_id")
    assert theirs.num_classes == 10 and theirs.get_classifier() is theirs.fc


def test_timm_registry_lists_our_presets_only_where_timm_has_none() -> None:
    import sasa_bench  # noqa: F401

    assert set(timm.list_models("sasa_*")) == set(list_models("sasa_*")) == {
        f"sasa_resnet{d}{s}" for d in (26, 38, 50, 101) for s in ("", "_convstem")
    }
    assert timm.models.model_entrypoint("resnet50").__module__ == "timm.models.resnet"  # not overwritten
    with pytest.raises(SasaError, match="no pretrained weights"):
        timm.create_model("sasa_resnet26", pretrained=True)
    with pytest.raises(SasaError, match="in_chans=1"):
        timm.create_model("sasa_resnet26", in_chans=1)


def test_import_order_timm_after_sasa_bench_registers() -> None:
    code = "import sasa_bench, timm; m = timm.create_model('sasa_resnet26', num_classes=10); print(type(m).__module__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sasa_bench.models.resnet"
    r = subprocess.run([sys.executable, "-c", "import sasa_bench, sys; print('timm' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False"  # importing sasa_bench does not import timm


def test_list_models_like_timm() -> None:
    assert list_models("sasa_resnet5*") == ["sasa_resnet50", "sasa_resnet50_convstem"]
    assert list_models(["resnet2*", "resnet3*"]) == ["resnet26", "resnet38"]
    assert "retinanet_resnet50" not in list_models("*resnet50*", exclude_filters="retinanet*")
    assert len(list_models()) == len(create_model.__globals__["PRESETS"])


# ----------------------------------------------------------------------------- peers study


def test_peers_study_expands_to_its_variants() -> None:
    from sasa_bench.studies import expand, load_study
    from sasa_bench.studies.runner import RunOptions, plan

    study = load_study("peers")
    variants = {v.name: v for v in expand(study)}
    sizes = {n: (v.spec.timm or v.spec.name, v.spec.image_size) for n, v in variants.items()}
    assert sizes["sasa_resnet50"] == ("sasa_resnet50", 224)
    assert sizes["resnet50"] == ("resnet50", 224)
    assert sizes["halonet26t"] == ("halonet26t", 256) and sizes["halonet50ts"] == ("halonet50ts", 256)
    assert sizes["botnet26t"] == ("botnet26t_256", 256) and sizes["botnet26t_224"] == ("botnet26t_256", 224)
    assert sizes["lambda_resnet26t"] == ("lambda_resnet26t", 256) and sizes["lambda_resnet26t_224"][1] == 224
    assert all(v.vs.name == "resnet50" and v.vs.image_size == 224 for v in variants.values())
    assert {v.spec.timm for v in variants.values()} >= {"resnet50", "halonet26t", "halonet50ts", "botnet26t_256", "lambda_resnet26t"}
    assert "peers" in run("ablate", "--list").stdout
    with pytest.raises(SasaError, match="run it with --train none"):
        plan(study, RunOptions(train="short"))


def test_report_accepts_the_intended_input_sizes_of_a_study() -> None:
    from sasa_bench.store import mixed_settings
    from sasa_bench.studies.check import varied_fields

    recs = [
        {"study": "peers", "variant": v, "train": "none", "spec": {"image_size": s, "num_classes": 1000, "backend": "auto"}}
        for v, s in (("a", 224), ("b", 256))
    ]
    assert mixed_settings(recs) and "image size" in mixed_settings(recs)[0]
    assert varied_fields()["peers"] == {"image_size"}
    assert mixed_settings(recs, varied={"peers": {"image_size"}}) == []
