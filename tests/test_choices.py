"""One home per concept: the choice sets (sasa_bench.choices) reject bad values with the list of
choices everywhere (layer, spec, CLI), the one device parser, and the peers report figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sasa_bench import LocalSelfAttention2d, make_spec
from sasa_bench.choices import Border, Choice, Format, Logits, Pos, Precision, Scale, Stem
from sasa_bench.cli.app import main
from sasa_bench.errors import SasaError
from sasa_bench.hardware import PRECISION_CHOICES, parse_device
from sasa_bench.layers.attention import POS_CHOICES


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


@pytest.mark.parametrize(
    "field, enum",
    [("pos", Pos), ("logits", Logits), ("border", Border), ("scale", Scale), ("stem", Stem)],
)
def test_spec_rejects_a_bad_choice_listing_the_choices(field: str, enum: type[Choice]) -> None:
    with pytest.raises(SasaError) as e:
        make_spec("sasa_resnet26", **{field: "bogus"})
    assert "'bogus'" in str(e.value) and f"choose from {', '.join(enum.values())}" in str(e.value)


def test_layer_takes_members_or_strings_and_stores_strings() -> None:
    a = LocalSelfAttention2d(8, 8, 3, 2, pos=Pos.ABSOLUTE, logits=Logits.QR, border=Border.ZEROS, scale=Scale.RSQRT)
    b = LocalSelfAttention2d(8, 8, 3, 2, pos="absolute", logits="qr", border="zeros", scale="rsqrt")
    assert repr(a) == repr(b) and type(a.pos) is str and a.pos == "absolute"
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(SasaError, match="unknown border 'pad' \\(choose from mask, zeros\\)"):
        LocalSelfAttention2d(8, 8, 3, 2, border="pad")
    s = make_spec("sasa_resnet26", pos=Pos.NONE, stem=Stem.CONV)
    assert type(s.pos) is str and s.to_dict()["pos"] == "none" and s == make_spec("sasa_resnet26", pos="none", stem="conv")


def test_one_definition_each() -> None:
    assert POS_CHOICES == Pos.values() == ("relative", "absolute", "none")
    assert PRECISION_CHOICES == Precision.values() == ("auto", "fp32", "bf16", "fp16")
    assert Format.values() == ("table", "json", "csv") and Logits.QK_QR == "qk+qr" and str(Stem.ATTENTION) == "attention"


@pytest.mark.parametrize(
    "args, flag, choices",
    [
        (["flops", "--pos", "sideways"], "--pos", Pos),
        (["flops", "--logits", "qk"], "--logits", Logits),
        (["flops", "--border", "wrap"], "--border", Border),
        (["flops", "--scale", "sqrt"], "--scale", Scale),
        (["flops", "--stem", "patchify"], "--stem", Stem),
        (["flops", "--format", "yaml"], "--format", Format),
        (["latency", "--precision", "fp64"], "--precision", Precision),
        (["train", "--precision", "int8"], "--precision", Precision),
        (["bench-layer", "--format", "xml"], "--format", Format),
    ],
)
def test_cli_rejects_bad_choices_with_the_list(capsys, args: list[str], flag: str, choices: type[Choice]) -> None:
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sasa-bench: error:") and flag in lines[0]
    assert all(f"'{c}'" in lines[0] for c in choices.values())


def test_help_lists_the_choices(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # rich's help table: wide enough to show every metavar whole
    code, out, _ = run_cli(capsys, "latency", "--help")
    assert code == 0
    text = " ".join(out.split())
    for c in (Pos, Border, Scale, Stem, Precision, Format):
        assert "|".join(c.values()) in text, c


def test_one_device_parser() -> None:
    assert parse_device("cpu") == torch.device("cpu") and parse_device(" CPU ") == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SasaError, match="unknown device 'tpu0'"):
        parse_device("tpu0")
    with pytest.raises(SasaError, match="choose from cpu"):
        parse_device("auto", allow_auto=False)
    if not torch.cuda.is_available():
        with pytest.raises(SasaError, match="CUDA is not available"):
            parse_device("cuda:1")


def test_peers_report_has_sizes_memory_and_the_latency_gflops_figure(tmp_path: Path) -> None:
    """The peers study's table shows each row's input size, latency and peak memory, and its
    figure plots latency against GFLOPS (fixture numbers, no timing)."""
    pytest.importorskip("timm")
    import matplotlib.image as mpimg

    from sasa_bench.report.document import write_report
    from sasa_bench.report.tables import build_tables, markdown
    from sasa_bench.store import write_result
    from sasa_bench.studies import expand, load_study
    from sasa_bench.studies.expand import result_key

    st = load_study("peers")
    for i, v in enumerate(expand(st)):
        rec = {
            "study": st.name, "study_title": st.title, "paper_ref": st.paper_ref, "paper_metric": st.metric,
            "variant": v.name, "label": v.label, "index": v.index, "seed": 0, "train": "none", "spec": v.spec.to_dict(),
            "flops": {"params": 10**7, "params_m": 10.0, "gmacs": 2.0 + i, "gflops": 4.0 + 2 * i, "image_size": v.spec.image_size},
            "latency": {"model": v.spec.name, "vs_model": v.vs.name, "median_ms": 100.0 + i, "vs_median_ms": 100.0,
                        "time_ratio": 1.0 + i / 100, "batch_size": 2, "device_name": "Fixture CPU", "threads": 1,
                        "peak_mem_mb": 50.0 + i},
            "training": None, "paper": {}, "note": v.note, "env": {"cpu": "Fixture CPU"}, "command": "x", "elapsed_s": 1.0,
        }
        write_result(tmp_path, st.name, result_key(v.name, "none", 0), rec)
    (t,) = [t for t in build_tables(tmp_path) if t.name == "peers"]
    md = markdown(t)
    assert "| input |" in md.replace("| input |", "| input |") and "256²" in md and "224²" in md
    assert "peak memory (MB)" in md and "latency (ms/batch)" in md
    fams = {r["variant"]: r["family"] for r in t.rows}
    assert fams["halonet26t"] == "halonet" and fams["botnet26t"] == "botnet" and fams["lambda_resnet26t"] == "lambda"
    assert fams["resnet50"] == "conv" and fams["sasa_resnet50"] == "full" and fams["swin_tiny"] == "swin"
    path, _ = write_report(tmp_path, tmp_path / "out")
    fig = tmp_path / "out" / "figures" / "peers_latency_gflops.png"
    assert fig.is_file() and mpimg.imread(fig).shape[0] > 100
    assert "peers_latency_gflops.png" in Path(path).read_text()
