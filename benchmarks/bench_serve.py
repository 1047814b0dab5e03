"""Loopback load test of `wsicodec serve`: tile latency (cold and warm cache), errors, server peak RSS.

    python benchmarks/bench_serve.py [CONTAINER] [--threads 8] [--requests 200] [--workers 4]

Starts `python -m wsicodec.cli serve CONTAINER` on 127.0.0.1 (a free port) in a subprocess, then
  cold: every client thread fetches DeepZoom tiles nobody has fetched yet (deepest levels first, as a viewer
        zoomed in would; up to threads x requests distinct tiles, fewer if the slide has fewer), so each one
        is decoded and encoded;
  warm: threads x requests fetches drawn at random from the tiles already fetched (served from the LRU).
Reports p50/p99/max latency, throughput and error count per phase and the server's peak RSS (VmHWM).
Without CONTAINER, a synthetic 3000 x 2400 slide at 0.5 µm/px is compressed first, with --model (default: a
tiny random model, whose decode cost is far below a real model's; --model builtin for wsicodec's default).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _make_container(tmp: Path, model_name: str) -> Path:
    import wsicodec
    from wsicodec.testing.synthetic import write_synthetic_slide
    from wsicodec.testing.tiny import write_tiny_taesd

    model = str(write_tiny_taesd(tmp / "tiny", seed=0)) if model_name == "tiny" else (
        None if model_name == "builtin" else model_name)
    slide = write_synthetic_slide(tmp / "bench.svs", 3000, 2400, mpp=0.5, objective_power=20, levels=[1, 4], seed=0)
    out = tmp / "bench.pzarr"
    wsicodec.compress(slide, out, model=model)
    return out


def _tile_urls(base: str, name: str) -> list[str]:
    xml = urllib.request.urlopen(f"{base}/slides/{name}.dzi", timeout=60).read()
    root = ET.fromstring(xml)
    size = root[0]
    w, h = int(size.get("Width")), int(size.get("Height"))
    ts = int(root.get("TileSize"))
    urls = []
    level, lw, lh = (max(w, h) - 1).bit_length(), w, h  # deepest DeepZoom level: ceil(log2(max side))
    while level >= 0:
        cols, rows = -(-lw // ts), -(-lh // ts)
        urls += [f"{base}/slides/{name}_files/{level}/{c}_{r}.jpeg" for r in range(rows) for c in range(cols)]
        level, lw, lh = level - 1, max(1, -(-lw // 2)), max(1, -(-lh // 2))
    return urls


def _run(urls_per_thread: list[list[str]]) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(urls):
        mine, bad = [], 0
        for url in urls:
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(url, timeout=120) as r:
                    r.read()
                    if r.status != 200:
                        bad += 1
            except (urllib.error.URLError, OSError):
                bad += 1
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client, args=(u,)) for u in urls_per_thread]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], time.perf_counter() - t0


def _summary(phase: str, lat: list[float], errors: int, wall: float) -> str:
    if not lat:
        return f"{phase:>5}: no requests"
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return (f"{phase:>5}: {len(lat):>5} requests  p50 {q[49] * 1000:7.1f} ms  p99 {q[98] * 1000:7.1f} ms  "
            f"max {max(lat) * 1000:7.1f} ms  {len(lat) / wall:7.1f} req/s  errors {errors}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("container", type=Path, nargs="?", help="a .pzarr (default: a synthetic one, tiny model)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200, help="requests per thread and phase")
    ap.add_argument("--workers", type=int, default=4, help="the server's decode threads (serve --workers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="tiny", help="model for the synthetic container: tiny (random, fastest), "
                    "builtin (wsicodec's default CPU model) or a registry name/folder")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        container = args.container or _make_container(Path(tmp), args.model)
        name = container.name.removesuffix(".zip").removesuffix(".pzarr")
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        server = subprocess.Popen(
            [sys.executable, "-m", "wsicodec.cli", "serve", str(container), "--port", str(port),
             "--workers", str(args.workers), "--cache-tiles", str(4 * args.threads * args.requests)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            t0 = time.perf_counter()
            while True:
                try:
                    urllib.request.urlopen(f"{base}/", timeout=5).read()
                    break
                except (urllib.error.URLError, OSError):
                    if server.poll() is not None or time.perf_counter() - t0 > 120:
                        print(server.stdout.read(), file=sys.stderr)
                        return 1
                    time.sleep(0.2)
            print(f"server up in {time.perf_counter() - t0:.1f} s; RSS peak {_peak_rss_mb(server.pid):.0f} MB")
            urls = _tile_urls(base, name)
            n = args.threads * args.requests
            cold = urls[:n]
            print(f"{container.name}: {len(urls)} DeepZoom tiles; {args.threads} threads, {len(cold)} cold "
                  f"(distinct, uncached) then {n} warm requests; server --workers {args.workers}, "
                  f"{os.cpu_count()} CPUs")
            lat, err, wall = _run([cold[i::args.threads] for i in range(args.threads)])
            print(_summary("cold", lat, err, wall))
            rng = random.Random(args.seed)
            lat, err, wall = _run([[rng.choice(cold) for _ in range(args.requests)] for _ in range(args.threads)])
            print(_summary("warm", lat, err, wall))
            print(f"server peak RSS (VmHWM): {_peak_rss_mb(server.pid):.0f} MB")
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
