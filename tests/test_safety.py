"""Outputs are safe: restore never replaces or writes into its input, concurrent runs never clobber each other,
interrupted or killed runs leave no partials behind, environment failures are one `error:` line, long names
work, and compress refuses up front what it could not finish sensibly."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsicodec._io import _HOST
from wsicodec.cli import app
from wsicodec.errors import OutputExistsError, SlideError, WsicodecError
from wsicodec.format.container import Container
from wsicodec.pipeline import compress as compress_module
from wsicodec.pipeline import restore as restore_module
from wsicodec.pipeline.compress import compress
from wsicodec.pipeline.restore import restore

REPO = Path(__file__).resolve().parents[1]
DEAD_PID = 999999999  # above any pid_max: never a live process


# ------------------------------------------------------------------ helpers
def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    # a failure must be a clean exit with a message, never an escaped exception
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_error_line(result, *needles) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def partials(out: Path) -> list[str]:
    """Everything beside ``out`` that a run writing it leaves (partials, level folders, probes)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name[:20]}"))


@pytest.fixture(scope="module")
def small_slide(synthetic_slide_factory) -> Path:
    """1200 x 1000 px at 0.5 µm/px: archived 1:1 as 5 x 4 tiles."""
    return synthetic_slide_factory(1200, 1000, mpp=0.5, objective_power=20, levels=[1], seed=3)


@pytest.fixture(scope="module")
def container(tmp_path_factory, small_slide, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("safety") / "c.pzarr"
    compress(small_slide, out, model=str(tiny_model_dir), device="cpu")
    return out


@pytest.fixture
def own_container(container, tmp_path) -> Path:
    """A private copy: a test that fails must not damage the shared one."""
    return Path(shutil.copytree(container, tmp_path / "in.pzarr"))


def zip_container(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    return dest


# ------------------------------------------------------------------ 1. restore never replaces or writes into its input
@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_restore_onto_its_own_input_is_refused(own_container, tmp_path, spelling, overwrite):
    (tmp_path / "sub").mkdir()
    out = {"same": own_container,
           "dotdot": tmp_path / "sub" / ".." / own_container.name,
           "symlink": tmp_path / "link.pzarr"}[spelling]
    if spelling == "symlink":
        out.symlink_to(own_container, target_is_directory=True)
    r = run_cli("restore", own_container, out, "--device", "cpu", "-q", *(["--overwrite"] if overwrite else []))
    one_error_line(r, "input container")
    assert Container.open(own_container).attrs  # still a container
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_restore_into_its_own_container_folder_is_refused(own_container):
    before = sorted(p.relative_to(own_container) for p in own_container.rglob("*"))
    for out in (own_container / "out.tiff", own_container / "latents" / "out.png"):
        args = ["--region", "0", "0", "16", "16"] if out.suffix == ".png" else []
        one_error_line(run_cli("restore", own_container, out, "--device", "cpu", "-q", *args), "inside")
    assert sorted(p.relative_to(own_container) for p in own_container.rglob("*")) == before


@pytest.mark.parametrize("kind", ["folder", "zip", "zip-named-tiff"])
def test_restore_never_replaces_another_container_even_with_overwrite(container, tmp_path, kind):
    if kind == "folder":
        other = Path(shutil.copytree(container, tmp_path / "other.pzarr"))
    else:
        other = zip_container(container, tmp_path / ("other.pzarr" if kind == "zip" else "other.tiff"))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    one_error_line(run_cli("restore", container, other, "--device", "cpu", "-q", "--overwrite"), "container")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    Container.open(other).close()


def test_restore_never_replaces_a_folder(container, tmp_path):
    out = tmp_path / "out.tiff"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    one_error_line(run_cli("restore", container, out, "--device", "cpu", "-q", "--overwrite"), "folder")
    assert (out / "keep.txt").read_text() == "user data"


# ------------------------------------------------------------------ 2. concurrent restores to one output
def test_output_appearing_while_restoring_is_not_replaced(container, tmp_path, monkeypatch):
    out = tmp_path / "o.tiff"
    write = restore_module.write_aperio_pyramid

    def rival_finishes_first(out_path, *args, on_level=None, **kwargs):
        def level_done(level, wh):
            if level == 0:
                Path(out_path).write_bytes(b"the other restore's output")
            if on_level is not None:
                on_level(level, wh)
        return write(out_path, *args, on_level=level_done, **kwargs)

    monkeypatch.setattr(restore_module, "write_aperio_pyramid", rival_finishes_first)
    line = one_error_line(run_cli("restore", container, out, "--device", "cpu", "-q"), str(out))
    assert "exists" in line or "appeared" in line
    assert out.read_bytes() == b"the other restore's output"
    assert partials(out) == []
    # the early check still refuses before any decoding
    monkeypatch.setattr(restore_module, "open_container", lambda p: pytest.fail("decoded despite the output"))
    one_error_line(run_cli("restore", container, out, "--device", "cpu", "-q"), "--overwrite")


# ------------------------------------------------------------------ 3. SIGTERM / SIGINT clean up like Ctrl-C
# The CLI as `python -m wsicodec` runs it, with level 0's strips slowed so the signal lands mid-write.
SLOW_CLI = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background test runner may ignore SIGINT
import wsicodec.pipeline.restore as r
prefetch = r.prefetch
def slow(items, *a, **k):
    for item in prefetch(items, *a, **k):
        time.sleep(0.5)
        yield item
r.prefetch = slow
from wsicodec.cli import app
app(prog_name="wsicodec", args=sys.argv[1:])
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.slow
def test_signal_removes_partials_and_exits(container, tmp_path, sig, code):
    out = tmp_path / "o.tiff"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "restore", str(container), str(out), "--device", "cpu",
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f".{out.name}.partial-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no partial appeared"
            time.sleep(0.02)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == ["error: interrupted"], stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ 4. a killed run's leftovers go with the next run
def test_stale_partials_of_dead_writers_are_removed(container, tmp_path):
    out = tmp_path / "o.tiff"
    dead_file = tmp_path / f".{out.name}.partial-{_HOST}-{DEAD_PID}-{secrets.token_hex(4)}"
    dead_file.write_bytes(b"half a tiff")
    dead_levels = tmp_path / f".{out.name}.levels-{_HOST}-{DEAD_PID}-{secrets.token_hex(4)}"
    dead_levels.mkdir()
    (dead_levels / "level1.raw").write_bytes(b"\0" * 100)
    # never removed: another host's (its pid means nothing here), a live writer's, another output's
    keep = [tmp_path / f".{out.name}.partial-otherhost-{DEAD_PID}-{secrets.token_hex(4)}",
            tmp_path / f".{out.name}.levels-{_HOST}-1-{secrets.token_hex(4)}",
            tmp_path / f".other.tiff.partial-{_HOST}-{DEAD_PID}-{secrets.token_hex(4)}"]
    for k in keep:
        k.mkdir()
    restore(container, out, device="cpu", progress=False)
    assert not dead_file.exists() and not dead_levels.exists()
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, *(k.name for k in keep)])


# ------------------------------------------------------------------ 5. environment failures are one line
def test_unwritable_output_folder_is_one_line(container, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: a path under a file fails for everyone
            (tmp_path / "somefile").write_text("x")
            out = tmp_path / "somefile" / "out.tiff"
        else:
            out = ro / "out.tiff"
        one_error_line(run_cli("restore", container, out, "--device", "cpu", "-q"))
    finally:
        ro.chmod(0o755)
    assert os.listdir(ro) == []


def test_disk_full_while_restoring_is_one_line(container, tmp_path, monkeypatch):
    out = tmp_path / "o.tiff"

    def disk_full(out_path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_path))

    monkeypatch.setattr(restore_module, "write_aperio_pyramid", disk_full)
    line = one_error_line(run_cli("restore", container, out, "--device", "cpu", "-q"))
    assert line == f"error: {out}: {os.strerror(errno.ENOSPC)}"


def test_os_errors_in_other_commands_are_one_line(small_slide, tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/models/weights.safetensors")

    monkeypatch.setattr(compress_module, "load_model", denied)
    one_error_line(run_cli("compress", small_slide, tmp_path / "o.pzarr", "-q"), "/models/weights.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [zipfile.BadZipFile("Bad CRC-32 for file 'zarr.json'"),
                                   zlib.error("Error -3 while decompressing data: invalid block type")])
def test_damaged_compressed_data_is_one_line(container, monkeypatch, error):
    def damaged(path):
        raise error

    monkeypatch.setattr(Container, "open", damaged)
    one_error_line(run_cli("info", container), str(error))


# ------------------------------------------------------------------ 6. long output names
def test_long_output_names(small_slide, tiny_model_dir, tmp_path):
    c = tmp_path / ("c" * 240 + ".pzarr")
    t = tmp_path / ("t" * 241 + ".tiff")
    assert len(c.name) == len(t.name) == 246
    compress(small_slide, c, model=str(tiny_model_dir), device="cpu")
    restore(c, t, device="cpu", progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted([c.name, t.name])
    Container.open(c).close()
    assert t.stat().st_size > 0


# ------------------------------------------------------------------ 7. compress checks its output folder first
@pytest.fixture
def no_encoding(monkeypatch):
    monkeypatch.setattr(compress_module, "load_model", lambda *a, **k: pytest.fail("loaded a model before the check"))


def test_compress_into_missing_folder_fails_before_encoding(small_slide, tmp_path, no_encoding):
    with pytest.raises(WsicodecError, match="output folder does not exist"):
        compress(small_slide, tmp_path / "nope" / "o.pzarr")
    one_error_line(run_cli("compress", small_slide, tmp_path / "nope" / "o.pzarr", "-q"), "does not exist")
    assert os.listdir(tmp_path) == []


def test_compress_into_unwritable_folder_fails_before_encoding(small_slide, tmp_path, no_encoding, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root: make the probe fail the way a read-only mount would
            monkeypatch.setattr(compress_module, "partial_name", lambda out, tag: out.parent / "gone" / tag)
        with pytest.raises(WsicodecError, match="cannot write to the output folder"):
            compress(small_slide, ro / "o.pzarr")
    finally:
        ro.chmod(0o755)
    assert os.listdir(ro) == []


# ------------------------------------------------------------------ 8. absurd resolutions and empty slides
@pytest.mark.parametrize("mpp, word", [("1000", "coarser"), ("0.01", "finer")])
def test_absurd_archive_resolution_is_refused(synthetic_slide, tmp_path, mpp, word, no_encoding):
    out = tmp_path / "o.pzarr"
    line = one_error_line(run_cli("compress", synthetic_slide, out, "--mpp", mpp, "-q"), word)
    assert mpp in line and "0.25" in line  # both resolutions
    assert os.listdir(tmp_path) == []


def test_slide_without_tissue_needs_allow_empty(synthetic_slide_factory, tiny_model_dir, tmp_path):
    blank = synthetic_slide_factory(600, 500, mpp=0.5, objective_power=20, tissue_fraction=0.0, levels=[1],
                                    with_associated=False)
    out = tmp_path / "o.pzarr"
    with pytest.raises(SlideError, match="no tissue found .*--allow-empty"):
        compress(blank, out, model=str(tiny_model_dir), device="cpu")
    one_error_line(run_cli("compress", blank, out, "--model", tiny_model_dir, "--device", "cpu", "-q"),
                   "no tissue found", "--allow-empty")
    assert os.listdir(tmp_path) == []
    r = run_cli("compress", blank, out, "--model", tiny_model_dir, "--device", "cpu", "-q", "--allow-empty")
    assert r.exit_code == 0, r.output
    assert Container.open(out).attrs["tiles"]["tissue"] == 0
    with pytest.raises(OutputExistsError):
        compress(blank, out, model=str(tiny_model_dir), device="cpu", allow_empty=True)


# ------------------------------------------------------------------ 9. bounded regions, odd names, odd outputs
def test_region_is_clipped_to_the_image(container, tmp_path):
    """1200 x 1000 px: a region reaching past the right and bottom edges (or before the origin) is cut to the
    image; its pixels are those of the same area read inside it."""
    from PIL import Image

    out = tmp_path / "r.png"
    r = run_cli("restore", container, out, "--device", "cpu", "-q", "--region", "1100", "900", "5000", "70000")
    assert r.exit_code == 0, r.output
    assert "100x100 px at level 0" in r.output and "clipped" in r.output
    inside = restore_module.restore_region(container, None, 1100, 900, 100, 100, device="cpu")
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), inside)
    before = restore_module.restore_region(container, None, -50, -20, 80, 40, device="cpu")
    np.testing.assert_array_equal(before, restore_module.restore_region(container, None, 0, 0, 30, 20, device="cpu"))
    one_error_line(run_cli("restore", container, tmp_path / "o.png", "--device", "cpu", "-q", "--region",
                           "1200", "0", "10", "10"), "outside the image")
    assert sorted(os.listdir(tmp_path)) == ["r.png"]


def test_region_over_the_memory_budget_is_refused():
    """1 GiB of RGB is the most one region may take (clip_region is what restore_region applies)."""
    from wsicodec.pipeline.restore import REGION_BUDGET_BYTES, clip_region

    assert REGION_BUDGET_BYTES == 2**30
    big = (100_000, 100_000)
    assert clip_region(big, 0, 0, 0, 16384, 21845) == (0, 0, 16384, 21845)  # 3 bytes a pixel: just under 1 GiB
    with pytest.raises(WsicodecError, match=r"16384x21846 px at level 0 would take 1,073,774,592 bytes as RGB, "
                                            r"over the 1 GiB \(1,073,741,824 bytes\) budget"):
        clip_region(big, 0, 0, 0, 16384, 21846)
    with pytest.raises(WsicodecError, match=r"50000x50000 px at level 1 .* 1 GiB \("):
        clip_region((50_000, 50_000), 1, 0, 0, 10**12, 10**12)  # clipped to the level's size first
    assert clip_region(big, 0, 99_990, 99_990, 10**12, 10**12) == (99_990, 99_990, 10, 10)


def test_region_over_the_budget_is_one_line_and_writes_nothing(container, tmp_path, monkeypatch):
    monkeypatch.setattr(restore_module, "REGION_BUDGET_BYTES", 100 * 100 * 3)  # the same rule, a small image
    out = tmp_path / "r.png"
    one_error_line(run_cli("restore", container, out, "--device", "cpu", "-q", "--region", "0", "0", "101", "100"),
                   "101x100 px", "budget")
    assert os.listdir(tmp_path) == []
    assert run_cli("restore", container, out, "--device", "cpu", "-q", "--region", "0", "0", "100", "100").exit_code == 0


@pytest.mark.parametrize("command", ["compress", "restore", "region", "batch"])
def test_a_256_byte_output_name_is_one_line(small_slide, container, tmp_path, command):
    suffix = {"compress": ".pzarr", "restore": ".tiff", "region": ".png", "batch": ""}[command]
    name = "n" * (256 - len(suffix)) + suffix
    assert len(name.encode()) == 256
    args = {"compress": ["compress", small_slide, tmp_path / name, "-q"],
            "restore": ["restore", container, tmp_path / name, "--device", "cpu", "-q"],
            "region": ["restore", container, tmp_path / name, "--device", "cpu", "-q", "--region", "0", "0", "8", "8"],
            "batch": ["restore", container, container, str(tmp_path / name) + "/", "--device", "cpu", "-q"]}[command]
    one_error_line(run_cli(*args), "at most 255 bytes")
    assert os.listdir(tmp_path) == []


def test_a_symlink_loop_in_a_restore_input_folder_is_one_line(container, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "c.pzarr").symlink_to(container, target_is_directory=True)
    (folder / "loop").symlink_to(folder / "loop")
    (tmp_path / "out").mkdir()
    one_error_line(run_cli("restore", folder, tmp_path / "out", "--device", "cpu", "-q"), "symbolic link loop")
    assert os.listdir(tmp_path / "out") == []
    # the loop named as the container itself
    one_error_line(run_cli("restore", folder / "loop", tmp_path / "o.tiff", "--device", "cpu", "-q"),
                   "symbolic link loop")
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def _special(kind: str, path: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:  # a link to a device node: the check follows links, and nothing here can touch the real device
        path.symlink_to("/dev/null")
    return path


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("command", ["restore", "region", "dicom", "compress"])
def test_outputs_are_never_devices_fifos_or_sockets(small_slide, container, tmp_path, kind, command):
    suffix = {"restore": ".tiff", "region": ".png", "dicom": "", "compress": ".pzarr"}[command]
    out = _special(kind, tmp_path / f"out{suffix}")
    args = {"restore": ["restore", container, out, "--device", "cpu", "-q"],
            "region": ["restore", container, out, "--device", "cpu", "-q", "--region", "0", "0", "8", "8"],
            "dicom": ["restore", container, out, "--device", "cpu", "-q", "--format", "dicom"],
            "compress": ["compress", small_slide, out, "-q"]}[command]
    one_error_line(run_cli(*args, "--overwrite"), str(out), {"fifo": "FIFO", "socket": "socket",
                                                             "device": "character device"}[kind])
    assert os.listdir(tmp_path) == [out.name]
    assert out.is_symlink() if kind == "device" else not out.is_file()


@pytest.mark.parametrize("command", ["restore", "region", "compress"])
def test_outputs_never_lie_inside_a_container(small_slide, container, own_container, tmp_path, command,
                                              no_encoding):
    """Not in the input container (section 1 above) and not in any other: a .pzarr folder holds only its keys."""
    before = sorted(p.relative_to(own_container) for p in own_container.rglob("*"))
    for out in (own_container / "x.tiff", own_container / "latents" / "c" / "x.tiff"):
        out = out.with_suffix({"restore": ".tiff", "region": ".png", "compress": ".pzarr"}[command])
        args = {"restore": ["restore", container, out, "--device", "cpu", "-q"],
                "region": ["restore", container, out, "--device", "cpu", "-q", "--region", "0", "0", "8", "8"],
                "compress": ["compress", small_slide, out, "-q"]}[command]
        one_error_line(run_cli(*args), "inside the .pzarr container", str(own_container))
    assert sorted(p.relative_to(own_container) for p in own_container.rglob("*")) == before
