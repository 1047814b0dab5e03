"""The CLI reads at 80 columns: every subcommand's --help and every table (models, info, stats, stats
--estimate, verify) fits 80 columns by wrapping, cuts nothing ("…", "..."), names extras literally and
shows plain metavars; piped output carries no terminal escapes; --json gives JSON; --version works."""

from __future__ import annotations

import json
import re

import typer.main
from typer.testing import CliRunner

import wsicodec
from wsicodec.cli import app

from test_restore import tiny_container, tiny_model_dir  # noqa: F401

ENV = {"COLUMNS": "80", "NO_COLOR": None, "FORCE_COLOR": None, "TTY_COMPATIBLE": None}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV)


def check_80(text: str) -> None:
    long = [line for line in text.splitlines() if len(line) > 80]
    assert not long, "\n".join(long)
    assert "…" not in text
    assert "\x1b[" not in text  # piped: plain text, no colours or cursor moves


def subcommands() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def test_every_help_fits_80_columns_and_cuts_nothing():
    names = subcommands()
    assert {"compress", "restore", "info", "verify", "stats", "models", "serve"} <= set(names)
    for args in [["--help"]] + [[name, "--help"] for name in names]:
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)
        check_80(r.stdout)
        # typer's type labels and click's cut summaries are not for people
        assert not re.search(r"<(bool|str|int|float|path|list)[^>]*>", r.stdout), (args, r.stdout)
        assert "{" not in r.stdout.splitlines()[0], r.stdout.splitlines()[0]


def test_root_help_lists_each_command_summary_whole():
    out = invoke("--help").stdout
    assert "Needs pip install \"wsicodec[viewer]\"." in " ".join(out.split())
    assert "..." not in out.split("Commands:")[1]


def test_extras_are_named_literally():
    assert 'pip install "wsicodec[viewer]"' in " ".join(invoke("serve", "--help").stdout.split())
    assert '"wsicodec[ray]"' in " ".join(invoke("compress", "--help").stdout.split())


def test_metavars_are_plain():
    out = invoke("restore", "--help").stdout
    for shown in ("--model NAME|DIR", "--device DEVICE", "--level N", "--format tiff|dicom", "--region X Y W H"):
        assert shown in out, shown
    assert "Usage: " in out and "CONTAINER..." in out


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"wsicodec {wsicodec.__version__}"


def test_models_table_at_80_columns_keeps_every_id_whole():
    from wsicodec.models.registry import models_table

    r = invoke("models")
    assert r.exit_code == 0, r.output
    check_80(r.stdout)
    for row in models_table():
        assert row["id"] in r.stdout
    rows = json.loads(invoke("models", "--json").stdout)
    assert {row["id"] for row in rows} == {row["id"] for row in models_table()}


def test_info_at_80_columns_rounds_and_gives_units(tiny_container):
    r = invoke("info", str(tiny_container))
    assert r.exit_code == 0, r.output
    check_80(r.stdout)
    assert re.search(r"archived_mpp: 0\.5 µm/px", r.stdout)
    assert re.search(r"container_bytes: [\d.]+ (KB|MB) \([\d,]+ bytes\)", r.stdout)
    assert not re.search(r"\d\.\d{5,}", r.stdout), r.stdout  # no raw float tails
    doc = json.loads(invoke("info", str(tiny_container), "--json").stdout)
    assert isinstance(doc["container_bytes"], int)


def test_stats_and_verify_at_80_columns(tiny_container, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_container.parent)
    # (a skipped input's line keeps its path whole, unwrapped, to be copied: a short one here)
    r = invoke("stats", tiny_container.name, "missing.pzarr")
    assert r.exit_code == 3, r.output  # one skipped
    check_80(r.stdout)
    assert "total (1 slide)" in r.stdout and "1 slides" not in r.stdout
    for column in ("source", "container", "ratio", "saved", "tissue", "bytes/tile"):
        assert column in r.stdout
    doc = json.loads(invoke("stats", tiny_container.name, "--json").stdout)
    assert doc["totals"]["slides"] == 1
    r = invoke("verify", tiny_container.name)
    assert r.exit_code == 0 and r.stdout.startswith("ok: "), r.output
    check_80(r.stdout)
    assert json.loads(invoke("verify", tiny_container.name, "--json").stdout)[0]["ok"] is True


def test_stats_estimate_at_80_columns(synthetic_slide, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(synthetic_slide.parent)
    r = invoke("stats", "--estimate", synthetic_slide.name, "--model", str(tiny_model_dir), "--sample", "4",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    check_80(r.stdout)
    for column in ("projected", "95%", "interval", "sampled", "bytes/tile"):
        assert column in r.stdout
    assert "total (1 slide)" in r.stdout
