"""`wsicodec serve`: the DeepZoom web viewer (docs/viewer.md), through Starlette's TestClient and a real browser."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

import wsicodec  # noqa: E402
from wsicodec.errors import WsicodecError  # noqa: E402
from wsicodec.viewer.server import build_app, load_slides  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_slide_factory, tiny_model_dir):
    """A small slide archived at its own resolution (0.5 µm/px), so the source view and the heat-map apply."""
    src = synthetic_slide_factory(1400, 1000, mpp=0.5, objective_power=20, levels=[1, 4], seed=3)
    out = tmp_path_factory.mktemp("serve") / "small.pzarr"
    wsicodec.compress(src, out, model=str(tiny_model_dir))
    return src, out


@pytest.fixture(scope="module")
def client(served):
    src, out = served
    app = build_app(load_slides([out], source=src), workers=2, cache_tiles=64)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _jpeg(resp) -> Image.Image:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(resp.content))
    img.load()
    assert img.format == "JPEG"
    return img


def test_index_lists_the_slide(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "small" in r.text and "/view/small" in r.text and "/slides/small/thumbnail.jpeg" in r.text
    assert _jpeg(client.get("/slides/small/thumbnail.jpeg")).size[0] <= 256


def test_dzi_and_tiles(client):
    r = client.get("/slides/small.dzi")
    assert r.status_code == 200
    root = ET.fromstring(r.content)
    assert root.tag.endswith("Image") and root.get("TileSize") == "254" and root.get("Overlap") == "1"
    assert root.get("Format") == "jpeg"
    size = root[0]
    w, h = int(size.get("Width")), int(size.get("Height"))
    assert (w, h) == (1400, 1000)
    deepest = max(w, h).bit_length()  # DeepZoom: levels 0..ceil(log2(max))
    img = _jpeg(client.get(f"/slides/small_files/{deepest}/0_0.jpeg"))
    assert img.size == (255, 255)  # 254 + one overlap pixel on the far side
    assert np.asarray(img).std() > 1  # not a flat colour
    _jpeg(client.get("/slides/small_files/0/0_0.jpeg"))
    _jpeg(client.get(f"/slides/small_files/{deepest}/0_0.jpeg"))  # again, from the cache
    assert client.app.state.cache.hits >= 1


def test_source_and_diff(client):
    r = client.get("/view/small")
    assert r.status_code == 200 and "/sources/small.dzi" in r.text and "/diff/small.dzi" in r.text
    assert "openseadragon.min.js" in r.text and "cdn" not in r.text.lower()
    ET.fromstring(client.get("/sources/small.dzi").content)
    ET.fromstring(client.get("/diff/small.dzi").content)
    src_tile = _jpeg(client.get("/sources/small_files/11/1_1.jpeg"))
    diff = np.asarray(_jpeg(client.get("/diff/small_files/11/1_1.jpeg")))
    assert src_tile.size == (256, 256)
    assert diff.shape == (256, 256, 3)
    # the heat-map is |restored - source| x4 of the very tiles the two viewers show (equal sizes here)
    from wsicodec.viewer.server import HOT, _diff_tile

    entry = client.app.state.entries["small"]
    restored = np.asarray(entry.dz.get_tile(11, (1, 1)).convert("RGB"), np.int16)
    source = np.asarray(entry.sdz().get_tile(11, (1, 1)).convert("RGB"), np.int16)
    want = HOT[np.clip(np.abs(restored - source).mean(axis=2) * 4 + 0.5, 0, 255).astype(np.uint8)]
    got = np.asarray(_diff_tile(entry, 11, 1, 1))
    assert np.abs(got.astype(int) - want).max() <= 1


def test_associated_and_static(client):
    _jpeg(client.get("/slides/small/associated/label.jpeg"))
    _jpeg(client.get("/slides/small/associated/macro.jpeg"))
    assert client.get("/slides/small/associated/nope.jpeg").status_code == 404
    r = client.get("/static/openseadragon/openseadragon.min.js")
    assert r.status_code == 200 and "6.1.1" in r.text[:200]
    assert client.get("/static/openseadragon/images/zoomin_rest.png").status_code == 200
    assert client.get("/static/viewer.js").status_code == 200


def test_openseadragon_is_pinned_and_shipped():
    from wsicodec.viewer import OPENSEADRAGON_VERSION, STATIC_DIR

    osd = STATIC_DIR / "openseadragon"
    assert (osd / "VERSION").read_text().split()[:2] == ["openseadragon", OPENSEADRAGON_VERSION]
    assert f"openseadragon {OPENSEADRAGON_VERSION}" in (osd / "openseadragon.min.js").read_text()[:100]
    assert (osd / "LICENSE.txt").exists() and len(list((osd / "images").glob("*.png"))) >= 20


@pytest.mark.parametrize("url", [
    "/slides/..%2F..%2Fetc%2Fpasswd.dzi",
    "/slides/..%2F..%2Fetc%2Fpasswd_files/0/0_0.jpeg",
    "/static/../cli.py",
    "/static/..%2F..%2Fcli.py",
    "/static/%2e%2e/server.py",
    "/static/",
    "/static/openseadragon/",
    "/static/openseadragon/images",
    "/slides/nope.dzi",
    "/slides/nope_files/0/0_0.jpeg",
    "/slides/nope/thumbnail.jpeg",
    "/view/nope",
    "/sources/nope.dzi",
    "/slides/small_files/99/0_0.jpeg",
    "/slides/small_files/-1/0_0.jpeg",
    "/slides/small_files/11/99_0.jpeg",
    "/slides/small_files/11/0_99.jpeg",
    "/slides/small_files/11/a_0.jpeg",
    "/slides/small_files/11/0_0.png",
    "/diff/small_files/99/0_0.jpeg",
    "/slides/small.pzarr/zarr.json",
    "/etc/passwd",
    # absurd numbers: past Python's 4300-digit int-from-text limit, past any level, past int64
    "/slides/small_files/" + "9" * 5001 + "/0_0.jpeg",
    "/slides/small_files/11/" + "1" * 5001 + "_0.jpeg",
    "/sources/small_files/11/0_" + "7" * 5001 + ".jpeg",
    "/diff/small_files/" + "5" * 5001 + "/0_0.jpeg",
    "/slides/small_files/999999999999999999/0_0.jpeg",
    "/slides/small_files/11/99999999999999999999999999_0.jpeg",
    "/slides/small_files/11/0_18446744073709551617.jpeg",
    "/slides/small_files/00000000000000000000011/0_0.jpeg",
])
def test_bad_urls_are_404(client, url):
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code, r.text[:200])
    assert "Traceback" not in r.text and "File \"" not in r.text


@pytest.mark.timeout(120)
def test_port_0_prints_the_port_it_got(served):
    """`serve --port 0` binds any free port and says which: the printed address answers."""
    import os
    import urllib.request

    _, out = served
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "wsicodec", "serve", str(out), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 1 slide(s) on http://127.0.0.1:"), (line, proc.stderr.read() if
                                                                            proc.poll() is not None else "")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert port > 0
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    assert resp.status == 200 and "/view/small" in resp.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        else:
            pytest.fail("the printed port never answered")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_without_a_source_there_is_no_side_by_side(served):
    _, out = served
    with TestClient(build_app(load_slides([out.parent]))) as c:
        page = c.get("/view/small")
        assert page.status_code == 200 and "/sources/" not in page.text
        assert c.get("/sources/small.dzi").status_code == 404
        assert c.get("/diff/small_files/0/0_0.jpeg").status_code == 404


def test_duplicate_names_and_bad_inputs_are_refused(served, tmp_path):
    src, out = served
    other = tmp_path / "copy"
    other.mkdir()
    shutil.copytree(out, other / out.name) if out.is_dir() else shutil.copy(out, other / out.name)
    with pytest.raises(WsicodecError, match="two containers"):
        load_slides([out, other])
    with pytest.raises(WsicodecError, match="--source goes with a single container"):
        load_slides([out, other / out.name], source=src)
    with pytest.raises(WsicodecError):
        load_slides([tmp_path / "missing"])


def test_cli_serve_refuses_duplicates(served, tmp_path):
    from typer.testing import CliRunner

    from wsicodec.cli import app

    _, out = served
    other = tmp_path / "b"
    other.mkdir()
    shutil.copytree(out, other / out.name) if out.is_dir() else shutil.copy(out, other / out.name)
    result = CliRunner().invoke(app, ["serve", str(out), str(other)])
    assert result.exit_code != 0 and "two containers" in result.output


def test_import_wsicodec_does_not_import_the_server():
    code = "import sys, wsicodec, wsicodec.cli; print('starlette' in sys.modules or 'uvicorn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ real browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM} (apt-get install chromium)")
def test_chromium_renders_the_viewer(served, tmp_path):
    uvicorn = pytest.importorskip("uvicorn")
    src, out = served
    app = build_app(load_slides([out], source=src), workers=2)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        png = tmp_path / "shot.png"
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000", f"--screenshot={png}",
               "--window-size=1200,800", f"http://127.0.0.1:{port}/view/small"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
        assert png.exists(), proc.stderr[-2000:]
        shot = np.asarray(Image.open(png).convert("RGB"), np.float32)
        assert shot.shape[:2] == (800, 1200)
        # the two viewer panes (below the header) hold tissue, not just the black OpenSeadragon background
        panes = shot[60:760, :1000]
        assert panes.std() > 10, f"blank screenshot (std {panes.std():.1f})"
        assert (panes.mean(axis=2) > 60).mean() > 0.1, "viewer panes are dark: no tiles drawn"
        stats = app.state.tile_stats.by_status
        assert stats.get(200, 0) >= 4, stats
        assert set(stats) == {200}, stats
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_source_dir_and_a_source_at_twice_the_resolution(synthetic_slide_factory, tiny_model_dir, tmp_path):
    """A 40x source archived at 20x: side by side (same area, half the pixels), heat-map resampled to match."""
    src = synthetic_slide_factory(1200, 900, mpp=0.25, objective_power=40, levels=[1, 4], seed=5)
    out = tmp_path / "forty.pzarr"
    wsicodec.compress(src, out, model=str(tiny_model_dir))
    entries = load_slides([out], source_dir=src.parent)
    assert entries["forty"].source_path == src
    with TestClient(build_app(entries)) as c:
        assert "/sources/forty.dzi" in c.get("/view/forty").text
        size = lambda kind: ET.fromstring(c.get(f"/{kind}/forty.dzi").content)[0]  # noqa: E731
        assert (size("slides").get("Width"), size("sources").get("Width")) == ("600", "1200")
        assert size("diff").get("Width") == "600"  # the heat-map is on the restored grid
        img = _jpeg(c.get("/diff/forty_files/10/0_0.jpeg"))
        assert img.size == (255, 255)
    missing = load_slides([out], source_dir=tmp_path)
    assert missing["forty"].source_path is None and "no source" in missing["forty"].note
