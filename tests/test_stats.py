"""`wsicodec stats`: sizes of existing containers, and estimates that must match what compress writes."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from typer.testing import CliRunner

from wsicodec.stats import report as st
from wsicodec.cli import app
from wsicodec.pipeline.compress import compress
from wsicodec.models import load_model
from wsicodec.testing.synthetic import write_synthetic_slide

runner = CliRunner()
SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "stats-schema.json"


def run_cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def validate(doc: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """A folder with two small synthetic slides (20x, ~50 and ~30 tissue tiles), a corrupt .svs and a text file."""
    folder = tmp_path_factory.mktemp("archive")
    write_synthetic_slide(folder / "a.svs", 2560, 2304, mpp=0.5, objective_power=20, tissue_fraction=0.5, seed=1)
    write_synthetic_slide(folder / "b.svs", 2048, 1792, mpp=0.5, objective_power=20, tissue_fraction=0.4, seed=2)
    (folder / "broken.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 40)
    (folder / "notes.txt").write_text("not a slide, and not named like one: ignored")
    return folder


@pytest.fixture(scope="module")
def compressed(slides, tiny_model, tmp_path_factory):
    """The real containers of the two good slides, written by compress with the settings the estimate uses."""
    out = tmp_path_factory.mktemp("containers")
    summaries = {}
    for name in ("a", "b"):
        summaries[name] = compress(slides / f"{name}.svs", out / f"{name}.pzarr", model=tiny_model)
    return out, summaries


@pytest.fixture(scope="module")
def estimated(slides, tiny_model):
    return st.estimate([slides / "a.svs", slides / "b.svs"], model=tiny_model, sample=12)


@pytest.mark.slow
def test_estimate_lands_within_15_percent_of_the_container_compress_writes(estimated, slides, compressed):
    _, summaries = compressed
    report = estimated
    assert not report.skipped
    for row in report.rows:
        real = summaries[Path(row.path).stem]
        assert row.tissue_tiles == real.tissue_tiles  # same grid and tissue rule as compress
        assert row.tiles_total == real.tiles_total
        assert row.sampled_tiles == 12 < row.tissue_tiles  # really extrapolated, not measured in full
        error = row.projected_bytes / real.container_bytes - 1
        assert abs(error) < 0.15, (row.name, row.projected_bytes, real.container_bytes)
        assert row.projected_low <= row.projected_bytes <= row.projected_high
        assert row.source_bytes == (slides / row.name).stat().st_size
        assert row.overhead_bytes > 0
    totals = report.totals()
    assert totals["after_bytes"] == sum(r.projected_bytes for r in report.rows)
    assert totals["after_low"] <= totals["after_bytes"] <= totals["after_high"]


def test_sampling_every_tissue_tile_reproduces_the_container_size(slides, tiny_model, compressed):
    out, summaries = compressed
    row = st.estimate([slides / "b.svs"], model=tiny_model, sample=10_000).rows[0]
    real = summaries["b"]
    assert row.sampled_tiles == real.tissue_tiles
    assert row.projected_low == row.projected_bytes == row.projected_high  # nothing left to extrapolate
    # a codebook fitted on all tiles (compress fits on 64 here, all of them) gives the same bytes
    assert abs(row.projected_bytes / real.container_bytes - 1) < 0.02


def test_folder_with_a_corrupt_slide_reports_the_good_ones_and_skips_the_bad(slides, tiny_model_dir, tmp_path):
    png = tmp_path / "deck.png"
    result = run_cli("stats", "--estimate", slides, "--model", tiny_model_dir, "--sample", "4", "--json",
                     "--plot", png)
    assert result.exit_code == st.SKIPPED_EXIT_CODE
    doc = json.loads(result.stdout)
    validate(doc)
    assert sorted(s["name"] for s in doc["slides"]) == ["a.svs", "b.svs"]
    assert len(doc["skipped"]) == 1 and doc["skipped"][0]["path"].endswith("broken.svs")
    assert doc["skipped"][0]["reason"]
    assert "broken.svs" in result.stderr  # also said where a person reads it
    assert doc["totals"]["slides"] == 2 and doc["totals"]["skipped"] == 1
    assert_plot_shows_bars(png)


def assert_plot_shows_bars(png: Path) -> None:
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG"
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert rgb.shape[0] > 400 and rgb.shape[1] > 600
    # both bar colours are really drawn (grey originals, blue projections)
    grey = np.all(np.abs(rgb - [0x9E, 0x9E, 0x9E]) < 6, axis=-1).sum()
    blue = np.all(np.abs(rgb - [0x1F, 0x77, 0xB4]) < 6, axis=-1).sum()
    assert grey > 500 and blue > 50


def test_missing_file_and_unresolved_slide_are_skipped_with_their_reason(tiny_model, tmp_path):
    no_mpp = write_synthetic_slide(tmp_path / "nompp.svs", 768, 768, mpp=None, objective_power=None)
    report = st.estimate([tmp_path / "gone.svs", no_mpp], model=tiny_model, sample=4)
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert "no such file" in reasons["gone.svs"]
    assert "--source-mpp" in reasons["nompp.svs"]
    assert report.rows == [] and report.exit_code == st.SKIPPED_EXIT_CODE
    # with --source-mpp it is estimated, and a slide that records its own resolution keeps it
    own = write_synthetic_slide(tmp_path / "own.svs", 768, 768, mpp=0.25, objective_power=40)
    fixed = st.estimate([no_mpp, own], model=tiny_model, sample=4, source_mpp=0.5)
    assert not fixed.skipped
    assert [r.source_mpp for r in fixed.rows] == [pytest.approx(0.5), pytest.approx(0.25)]


def test_table_csv_plot_and_json_of_an_estimate(estimated, tmp_path):
    from rich.console import Console

    report = estimated
    report.price_per_tb_month = 10.0
    console = Console(record=True, width=200)
    st.print_table(report, console)
    text = console.export_text()
    assert "a.svs" in text and "total (2 slides)" in text and "$10/TB-month" in text

    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["a.svs", "b.svs", "TOTAL"]
    assert int(rows[2]["projected_bytes"]) == int(rows[0]["projected_bytes"]) + int(rows[1]["projected_bytes"])

    doc = report.to_json()
    validate(doc)
    broken = json.loads(json.dumps(doc))
    del broken["slides"][0]["projected_high"]
    with pytest.raises(jsonschema.ValidationError):  # the schema really constrains the rows
        validate(broken)
    assert doc["price"]["tier"] == "user"
    assert doc["totals"]["cost_per_year_after"] == pytest.approx(doc["totals"]["after_bytes"] / 1e12 * 120, abs=0.01)

    png = st.plot(report, tmp_path / "p.png")
    assert_plot_shows_bars(png)
    report.price_per_tb_month = st.DEFAULT_PRICE_PER_TB_MONTH


def test_stats_on_existing_containers_totals_correctly(compressed, slides, estimated):
    out, summaries = compressed
    broken = out / "broken.pzarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    try:
        result = run_cli("stats", out, "--json")
    finally:
        shutil.rmtree(broken)
    assert result.exit_code == st.SKIPPED_EXIT_CODE
    doc = json.loads(result.stdout)
    validate(doc)
    assert [Path(s["path"]).name for s in doc["skipped"]] == ["broken.pzarr"]
    rows = {s["name"]: s for s in doc["slides"]}
    assert sorted(rows) == ["a.pzarr", "b.pzarr"]
    for name, summary in summaries.items():
        row = rows[f"{name}.pzarr"]
        assert row["source_bytes"] == (slides / f"{name}.svs").stat().st_size
        assert row["container_bytes"] == summary.container_bytes
        assert row["tissue_tiles"] == summary.tissue_tiles
        assert row["ratio"] == pytest.approx(summary.source_bytes / summary.container_bytes)
        assert row["source_name"] == f"{name}.svs"
        assert row["quantizer"]["kind"] == "kmeans"
        assert 0 < row["latents_bytes"] < row["container_bytes"]
        # a tile costs what the estimate said it would
        est = next(r for r in estimated.rows if r.name == f"{name}.svs")
        assert row["latent_bytes_per_tissue_tile"] == pytest.approx(est.bytes_per_tile_mean, rel=0.15)
    t = doc["totals"]
    assert t["source_bytes"] == sum(s.source_bytes for s in summaries.values())
    assert t["after_bytes"] == sum(s.container_bytes for s in summaries.values())
    assert t["saved_bytes"] == t["source_bytes"] - t["after_bytes"]
    assert t["cost_per_year_saved"] == pytest.approx(t["saved_bytes"] / 1e12 * 23.0 * 12, abs=0.01)

    plain = run_cli("stats", out / "a.pzarr", out / "b.pzarr")
    assert plain.exit_code == 0 and "a.pzarr" in plain.stdout and "total" in plain.stdout


@pytest.mark.slow
def test_cmu1_estimate_within_15_percent_on_any_machine(cmu1_path, tiny_model, tmp_path):
    # a real Aperio slide with label, macro and thumbnail: the overhead the estimate measures is real
    real = compress(cmu1_path, tmp_path / "cmu.pzarr", model=tiny_model)
    row = st.estimate([cmu1_path], model=tiny_model, sample=12).rows[0]
    assert row.tissue_tiles == real.tissue_tiles > row.sampled_tiles == 12
    assert abs(row.projected_bytes / real.container_bytes - 1) < 0.15, (row.projected_bytes, real.container_bytes)
    assert row.source_mpp == pytest.approx(0.499, abs=1e-3)


@pytest.mark.slow
def test_cmu1_taef2_estimate_within_15_percent(cmu1_path, taef2_dir, tmp_path):
    # 1 µm/px (10x) keeps TAEF2's full-resolution convolutions to ~20 tiles on a shared CPU;
    # benchmarks/bench_stats_estimate.py measures the 0.5 µm/px default on bigger slides
    model = load_model(str(taef2_dir), device="cpu")
    real = compress(cmu1_path, tmp_path / "cmu.pzarr", model=model, target_mpp=1.0)
    row = st.estimate([cmu1_path], model=model, sample=8, target_mpp=1.0).rows[0]
    assert row.tissue_tiles == real.tissue_tiles > row.sampled_tiles == 8
    assert abs(row.projected_bytes / real.container_bytes - 1) < 0.15, (row.projected_bytes, real.container_bytes)
    assert row.projected_low < row.projected_bytes < row.projected_high  # a real interval, not a point
    assert row.model == real.model_id and row.quantizer["kind"] == "kmeans"


def test_extrapolation_interval_is_t_based_and_exact_when_everything_is_measured():
    point, low, high, mean, sd = st.extrapolate([100, 120, 80, 100], n_tissue=4, overhead=50)
    assert (point, low, high) == (450, 450, 450)
    point, low, high, mean, sd = st.extrapolate([100, 120, 80, 100], n_tissue=1000, overhead=50)
    assert point == 50 + 1000 * 100 and mean == 100
    half = 3.182446305284263 * sd / 2 * 1000 * np.sqrt(996 / 999)  # t(0.975, 3)
    assert high - point == pytest.approx(half, abs=1) and point - low == pytest.approx(half, abs=1)


def test_help_states_the_default_price_and_its_tier():
    text = " ".join(run_cli("stats", "--help").stdout.split())  # help wraps at the terminal's width
    assert f"{st.DEFAULT_PRICE_PER_TB_MONTH:g}" in text and "S3 Standard" in text


def test_nothing_readable_means_an_error_line_and_no_traceback(tmp_path):
    result = run_cli("stats", tmp_path / "missing.pzarr")
    assert result.exit_code == st.SKIPPED_EXIT_CODE
    assert "no such file" in result.output


def test_a_bad_quantiser_is_one_usage_error_not_a_skip_per_slide(slides, tiny_model_dir):
    bad = run_cli("stats", "--estimate", slides / "b.svs", "--model", tiny_model_dir, "--quant", "bogus")
    assert bad.exit_code == 2
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bogus" in lines[0]
