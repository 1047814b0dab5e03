"""Batch compress and restore (wsicodec/pipeline/batch.py, docs/batch.md): finding slides, resuming, the run
log, retries, worker processes that die, kill -9 and rerun, Ray, restore batches and `stats` over a batch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsicodec.cli import app
from wsicodec.errors import WsicodecError
from wsicodec.format.container import Container
from wsicodec.pipeline import batch
from wsicodec.pipeline.batch import (CRASH_ENV, RUN_LOG_NAME, CompressOptions, RestoreOptions, compress_batch,
                                     discover_slides, is_batch, read_log, restore_batch)
from wsicodec.pipeline.verify import verify_container

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "docs" / "stats-schema.json"
LOG_KEYS = {"slide", "output", "status", "reason", "bytes", "tiles", "seconds", "host", "pid", "time"}


def _copy_slides(synthetic_slide_factory, folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(names):
        src = synthetic_slide_factory(640, 512, mpp=0.5, objective_power=20, levels=[1], seed=20 + i)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / rel)
    return folder


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory, synthetic_slide_factory) -> Path:
    """a.svs, b.svs and sub/c.svs: three small synthetic slides, one in a subfolder."""
    return _copy_slides(synthetic_slide_factory, tmp_path_factory.mktemp("batch") / "slides",
                        ["a.svs", "b.svs", "sub/c.svs"])


@pytest.fixture(scope="module")
def options(tiny_model_dir) -> CompressOptions:
    return CompressOptions(model=str(tiny_model_dir))


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _verified(folder: Path) -> None:
    for p in folder.glob("*.pzarr"):
        report = verify_container(p)
        assert report.ok and report.checksummed, (p, report.problems)


# ------------------------------------------------------------------------------------- discovery
def test_discovery_folders_dicom_manifests_and_duplicate_names(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for rel in ("a.svs", "sub/c.ndpi", ".a.svs.partial-x", "notes.md"):
        (root / rel).write_bytes(b"x")
    (root / "series7").mkdir()
    for n in ("2.dcm", "1.dcm"):
        (root / "series7" / n).write_bytes(b"x")
    (root / "old.pzarr").mkdir()
    (root / "old.pzarr" / "zarr.json").write_text("{}")
    (root / "archive").mkdir()  # the output folder inside the input folder is never searched
    (root / "archive" / "z.svs").write_bytes(b"x")

    jobs = discover_slides([root], root / "archive")
    assert sorted(j.name for j in jobs) == ["a", "c", "series7"]
    dicom = next(j for j in jobs if j.name == "series7")
    # OpenSlide cannot open a folder; it opens one file of the series and finds the rest beside it
    assert dicom.slide == str(root / "series7") and dicom.open_path == str(root / "series7" / "1.dcm")

    (tmp_path / "m.csv").write_text("path,output,source_mpp\n# a comment\nin/a.svs,renamed.pzarr,0.25\n\n"
                                    "in/series7,,\n")
    (tmp_path / "m.txt").write_text("# slides\nin/sub/c.ndpi\n\n")
    jobs = discover_slides([tmp_path / "m.csv", tmp_path / "m.txt"])
    assert [(j.name, j.source_mpp) for j in jobs] == [("renamed", 0.25), ("series7", None), ("c", None)]
    assert jobs[0].open_path == str(tmp_path / "in" / "a.svs")  # relative to the manifest's folder

    (tmp_path / "plain.csv").write_text("in/a.svs,first\nin/sub/c.ndpi\n")  # no header: path, output, mpp
    assert [j.name for j in discover_slides([tmp_path / "plain.csv"])] == ["first", "c"]

    (tmp_path / "bad.csv").write_text("path,source_mpp\nin/a.svs,fast\n")
    with pytest.raises(WsicodecError, match="bad.csv line 2: source_mpp"):
        discover_slides([tmp_path / "bad.csv"])

    (root / "sub" / "a.tif").write_bytes(b"x")  # a.svs and sub/a.tif would both be a.pzarr
    with pytest.raises(WsicodecError, match="same name 'a'"):
        discover_slides([root])
    # the same file named twice is one slide, not a clash
    assert len(discover_slides([root / "a.svs", root / "a.svs"])) == 1
    # a missing slide is kept: it fails on its own when its turn comes
    assert discover_slides([tmp_path / "gone.svs"])[0].name == "gone"


def test_batch_or_single(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    container = tmp_path / "s.pzarr"
    container.mkdir()
    (container / "zarr.json").write_text("{}")
    (tmp_path / "list.txt").write_text("a.svs\n")
    assert not is_batch(["s.svs", "s.pzarr"])
    assert not is_batch(["s.svs", str(container)])  # an existing container: single compress --overwrite
    assert is_batch(["s.svs", "new/"])
    assert is_batch(["s.svs", str(out_dir)])
    assert is_batch([str(tmp_path), "x"])
    assert is_batch([str(tmp_path / "list.txt"), "x"])
    assert is_batch(["a.svs", "b.svs", "out"])
    assert not is_batch(["s.pzarr", "s.tiff"], "restore")
    assert is_batch([str(container), str(out_dir)], "restore")
    assert not is_batch([str(tmp_path / "list.txt"), "x.tiff"], "restore")
    (tmp_path / "out.tiff").mkdir()  # a folder named like an output file: single restore (which refuses it)
    assert not is_batch([str(container), str(tmp_path / "out.tiff")], "restore")


def test_workers_one_per_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert batch.plan_workers(None, None) == ["cuda:0", "cuda:1"]
    assert batch.plan_workers(3, "cuda") == ["cuda:0", "cuda:1", "cuda:0"]
    assert batch.plan_workers(None, "cpu") == ["cpu"]
    assert batch.plan_workers(2, "cuda:1") == ["cuda:1", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert batch.plan_workers(None, None) == [None]


def test_log_lines_stay_whole_under_concurrent_appends(tmp_path):
    log = tmp_path / RUN_LOG_NAME

    def writer(k: int) -> None:
        for i in range(200):
            batch.append_log(log, {"writer": k, "i": i, "pad": "x" * 300})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = log.read_text().splitlines()
    assert len(lines) == 800 and len(read_log(log)) == 800


# ------------------------------------------------------------------------------------- compress, resume
@pytest.mark.slow
def test_batch_compress_resume_and_redo(slide_dir, options, tmp_path):
    had_ray = "ray" in sys.modules
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    out = tmp_path / "out"

    first = compress_batch([slide_dir, bad], out, options)
    assert first.counts() == {"ok": 3, "skipped": 0, "failed": 1} and first.exit_code == 1
    assert first.backend == "inline" and first.workers == 1
    assert _names(out) == ["a.pzarr", "b.pzarr", "c.pzarr", RUN_LOG_NAME]  # nothing for the broken slide
    _verified(out)
    log = read_log(out / RUN_LOG_NAME)
    assert len(log) == 4 and all(LOG_KEYS <= set(r) for r in log)
    failed = next(r for r in log if r["status"] == "failed")
    assert failed["slide"] == str(bad) and "OpenSlide cannot open" in failed["reason"]
    ok = next(r for r in log if r["output"].endswith("a.pzarr"))
    assert ok["bytes"] > 0 and ok["tiles"] > 0 and ok["pid"] == os.getpid() and ok["attempt"] == 1
    # the default path never imports Ray
    assert had_ray or "ray" not in sys.modules

    again = compress_batch([slide_dir], out, options)
    assert again.counts() == {"ok": 0, "skipped": 3, "failed": 0} and again.exit_code == 0
    assert all("up to date" in r["reason"] for r in again.records)

    # damage one container, change one source: only those two are redone
    shard = out / "a.pzarr" / "latents" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    changed = tmp_path / "changed"
    shutil.copytree(slide_dir, changed)
    with open(changed / "b.svs", "ab") as fh:
        fh.write(b"\0" * 16)  # OpenSlide still reads it; its SHA-256 differs
    third = compress_batch([changed], out, options)
    reasons = {Path(r["output"]).name: (r["status"], r["reason"]) for r in third.records}
    assert reasons["a.pzarr"][0] == "ok" and "container damaged" in reasons["a.pzarr"][1]
    assert reasons["b.pzarr"] == ("ok", "redone: source changed: its SHA-256 differs from the container's record")
    assert reasons["c.pzarr"][0] == "skipped"
    _verified(out)

    # other settings: everything is redone, replacing the old containers
    fourth = compress_batch([changed], out, CompressOptions(model=options.model, levels=64))
    assert fourth.counts()["ok"] == 3
    assert all("settings changed: levels 256 -> 64" in r["reason"] for r in fourth.records)
    with Container.open(out / "c.pzarr") as c:
        assert c.attrs["quantizer"]["levels"] == 64
    assert len(read_log(out / RUN_LOG_NAME)) == 4 + 3 + 3 + 3


def test_switching_between_folder_and_single_file_containers(slide_dir, options, tmp_path):
    out = tmp_path / "out"
    first = compress_batch([slide_dir / "a.svs"], out, CompressOptions(model=options.model, single_file=True))
    assert first.counts()["ok"] == 1 and (out / "a.pzarr").is_file()
    # a folder container cannot be renamed onto a file: the old one is set aside, then removed
    second = compress_batch([slide_dir / "a.svs"], out, options)
    assert second.records[0]["reason"] == "redone: settings changed: single file True -> False"
    assert (out / "a.pzarr").is_dir() and _names(out) == ["a.pzarr", RUN_LOG_NAME]
    _verified(out)


def test_retries_and_input_errors(slide_dir, options, tmp_path, monkeypatch):
    import wsicodec.pipeline.compress as cmp

    real = cmp.compress
    calls: list[str] = []

    def flaky(slide, out, **kw):
        calls.append(Path(out).name)
        if Path(out).name == "b.pzarr" and calls.count("b.pzarr") == 1:
            raise RuntimeError("transient trouble")
        return real(slide, out, **kw)

    monkeypatch.setattr(cmp, "compress", flaky)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"nope")
    res = compress_batch([slide_dir / "a.svs", slide_dir / "b.svs", bad], tmp_path / "out", options, retries=2)
    assert res.counts() == {"ok": 2, "skipped": 0, "failed": 1}
    log = read_log(tmp_path / "out" / RUN_LOG_NAME)
    b = [r for r in log if r["output"].endswith("b.pzarr")]
    assert [(r["status"], r["attempt"]) for r in b] == [("failed", 1), ("ok", 2)]
    assert b[0]["reason"] == "RuntimeError: transient trouble"
    assert [r["attempt"] for r in log if r["output"].endswith("bad.pzarr")] == [1]  # input errors: no retry

    calls.clear()
    res = compress_batch([slide_dir / "b.svs"], tmp_path / "out0", options, retries=0)
    assert res.counts()["failed"] == 1 and res.exit_code == 1


def test_an_unusable_model_stops_the_run(slide_dir, tmp_path):
    with pytest.raises(WsicodecError):
        compress_batch([slide_dir], tmp_path / "out", CompressOptions(model=str(tmp_path / "no-such-model")))
    with pytest.raises(WsicodecError, match="unknown quantiser"):
        compress_batch([slide_dir], tmp_path / "out", CompressOptions(quant="jpeg"))


def test_cli_batch_summary_and_stats_reads_the_run_log(slide_dir, tiny_model_dir, tmp_path):
    import jsonschema

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    out = tmp_path / "archive"
    runner = CliRunner()
    res = runner.invoke(app, ["compress", str(slide_dir / "a.svs"), str(bad), f"{out}{os.sep}", "--model",
                              str(tiny_model_dir), "-q"])
    assert res.exit_code == 1, res.output
    assert "wsicodec compress" in res.output and "broken.svs" in res.output and RUN_LOG_NAME in res.output

    res = runner.invoke(app, ["stats", str(out), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(doc)
    runs = doc["runs"]
    assert runs["slides"] == {"ok": 1, "skipped": 0, "failed": 1} and runs["runs"] == 1
    assert runs["failed"][0]["slide"] == str(bad) and "OpenSlide" in runs["failed"][0]["reason"]
    res = runner.invoke(app, ["stats", str(out)])
    assert "batch runs" in res.output and "broken.svs" in res.output
    # a folder without a run log: no "runs" key, the report is as before
    res = runner.invoke(app, ["stats", str(out / "a.pzarr"), "--json"])
    assert "runs" not in json.loads(res.stdout)


def test_without_ray_one_line_says_how_to_install_it(slide_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    res = CliRunner().invoke(app, ["compress", str(slide_dir), str(tmp_path / "out"), "--ray", "local"])
    assert res.exit_code == 2
    assert 'pip install "wsicodec[ray]"' in res.output
    assert not (tmp_path / "out" / RUN_LOG_NAME).exists()


# ------------------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_jobs_2_survives_a_worker_that_dies(slide_dir, options, tmp_path, monkeypatch):
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(CRASH_ENV, f"b={marker}")
    res = compress_batch([slide_dir], tmp_path / "out", options, jobs=2, retries=1)
    assert marker.exists()  # the worker holding b really died
    assert res.backend == "processes" and res.workers == 2
    assert res.counts() == {"ok": 3, "skipped": 0, "failed": 0}
    log = read_log(tmp_path / "out" / RUN_LOG_NAME)
    b = [r for r in log if r["output"].endswith("b.pzarr")]
    assert [(r["status"], r["attempt"]) for r in b] == [("failed", 1), ("ok", 2)]
    assert b[0]["error"] == "WorkerDied" and "exit code 17" in b[0]["reason"]
    assert len({r["pid"] for r in log if r["status"] == "ok"} - {os.getpid()}) >= 2  # ran in the workers
    _verified(tmp_path / "out")
    assert _names(tmp_path / "out") == ["a.pzarr", "b.pzarr", "c.pzarr", RUN_LOG_NAME]


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_same_containers(synthetic_slide_factory, options, tmp_path):
    slides = _copy_slides(synthetic_slide_factory, tmp_path / "slides", [f"s{i}.svs" for i in range(4)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsicodec", "compress", str(slides), str(out), "--model", options.model, "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    log = out / RUN_LOG_NAME
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_log(log))
    assert 1 <= done_before < 4, f"the kill should land mid-run ({done_before} slides done)"

    rerun = compress_batch([slides], out, options)
    assert rerun.exit_code == 0
    assert rerun.counts()["skipped"] >= done_before
    reference = compress_batch([slides], tmp_path / "reference", options)
    assert _names(out) == _names(tmp_path / "reference") == [f"s{i}.pzarr" for i in range(4)] + [RUN_LOG_NAME]
    _verified(out)
    assert reference.counts()["ok"] == 4


# ------------------------------------------------------------------------------------- Ray
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='Ray is not installed (pip install "wsicodec[ray]")')
def test_ray_local_retries_a_killed_worker(slide_dir, options, tmp_path):
    marker = tmp_path / "crashed-once"
    out = tmp_path / "out"
    env = {**os.environ, CRASH_ENV: f"b={marker}"}
    cmd = [sys.executable, "-m", "wsicodec", "compress", str(slide_dir), f"{out}/", "--model", options.model,
           "--ray", "local", "--jobs", "2", "--retries", "2", "--json"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker.exists()  # the Ray worker running b died once (os._exit) and Ray ran b again
    doc = json.loads(res.stdout)
    assert doc["totals"]["ok"] == 3 and doc["totals"]["backend"] == "ray"
    log = read_log(out / RUN_LOG_NAME)
    assert sorted(Path(r["output"]).name for r in log) == ["a.pzarr", "b.pzarr", "c.pzarr"]
    assert all(r["status"] == "ok" and r["pid"] != os.getpid() for r in log)
    _verified(out)
    assert _names(out) == ["a.pzarr", "b.pzarr", "c.pzarr", RUN_LOG_NAME]


# ------------------------------------------------------------------------------------- restore
def test_restore_batch_resumes_by_write_id(slide_dir, options, tmp_path):
    archive = tmp_path / "archive"
    compress_batch([slide_dir], archive, options)
    out = tmp_path / "restored"
    first = restore_batch([archive], out)
    assert first.counts() == {"ok": 3, "skipped": 0, "failed": 0}
    for name in ("a", "b", "c"):
        with Container.open(archive / f"{name}.pzarr") as c:
            write_id = c.attrs["integrity"]["write_id"]
        done = json.loads((out / f"{name}.tiff.done").read_text())
        assert done["write_id"] == write_id and (out / f"{name}.tiff").stat().st_size == done["bytes"]
    again = restore_batch([archive], out)
    assert again.counts() == {"ok": 0, "skipped": 3, "failed": 0}

    # a container written anew (new write_id): only its output is restored again
    compress_batch([slide_dir / "a.svs"], archive, CompressOptions(model=options.model, overwrite=True))
    (out / "b.tiff.done").unlink()  # an output without its sidecar is not trusted either
    third = restore_batch([archive], out, RestoreOptions(compression="zstd"))
    assert {Path(r["output"]).name: r["status"] for r in third.records} == {
        "a.tiff": "ok", "b.tiff": "ok", "c.tiff": "skipped"}

    res = CliRunner().invoke(app, ["restore", str(archive / "c.pzarr"), str(out), "-q"])
    assert res.exit_code == 0, res.output
    log = read_log(out / RUN_LOG_NAME)
    assert [r["op"] for r in log] == ["restore"] * 10 and log[-1]["status"] == "skipped"
