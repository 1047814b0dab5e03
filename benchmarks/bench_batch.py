"""Batch compress throughput: `--jobs 1` (the baseline, in the same run) against `--jobs 2` and more.

    python benchmarks/bench_batch.py [--slides 6] [--size 2048] [--jobs 1,2] [--model M] [--device cpu]

Writes a folder of synthetic slides (wsicodec.testing.synthetic), then runs
`wsicodec compress SLIDES/ OUT/ --jobs N` once per N, each in a fresh process with a fresh output folder, and
prints per run: wall seconds, slides/s, the speed-up over the first (--jobs 1) run, the peak RSS of the
whole process tree (os.wait4's rusage: the largest of the command and the workers it reaped) and each
worker's own peak RSS (from the run log's peak_rss_mib). Don't run it beside other heavy work: on a machine
with fewer cores than workers the speed-up measures the contention, not the code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsicodec.pipeline.batch import RUN_LOG_NAME, read_log  # noqa: E402


def make_slides(folder: Path, n: int, size: int) -> list[Path]:
    from wsicodec.testing.synthetic import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    return [write_synthetic_slide(folder / f"slide-{i:02d}.svs", size, size * 4 // 5, mpp=0.5, objective_power=20,
                                  levels=[1, 4], seed=100 + i) for i in range(n)]


def maxrss_mib(ru_maxrss: int) -> float:
    return ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def run(slides: Path, out: Path, jobs: int, model: str | None, device: str | None) -> dict:
    cmd = [sys.executable, "-m", "wsicodec", "compress", str(slides), f"{out}{os.sep}", "--jobs", str(jobs),
           "--quiet", "--json"]
    if model:
        cmd += ["--model", model]
    if device:
        cmd += ["--device", device]
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it with its rusage (subprocess must not wait first)
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    if code != 0:
        raise SystemExit(f"--jobs {jobs} failed ({code}): {stderr.decode()[-2000:]}")
    totals = json.loads(stdout)["totals"]
    per_pid: dict[int, float] = {}
    for rec in read_log(out / RUN_LOG_NAME):
        if rec.get("peak_rss_mib") is not None:
            per_pid[rec["pid"]] = max(per_pid.get(rec["pid"], 0.0), rec["peak_rss_mib"])
    return {"jobs": jobs, "wall": wall, "slides": totals["slides"], "ok": totals["ok"], "tiles": totals["tiles"],
            "backend": totals["backend"], "tree_peak_mib": maxrss_mib(usage.ru_maxrss),
            "worker_peaks_mib": sorted(per_pid.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=6, help="synthetic slides to make (default 6)")
    ap.add_argument("--size", type=int, default=2048, help="their width in px at 0.5 µm/px (height 4/5 of it)")
    ap.add_argument("--jobs", default="1,2", help="comma-separated --jobs values; the first is the baseline")
    ap.add_argument("--model", default=None, help="default: the builtin model")
    ap.add_argument("--device", default=None, help="default: as compress (CUDA if present)")
    ap.add_argument("--keep", action="store_true", help="keep the slides and outputs (default: removed)")
    args = ap.parse_args()
    jobs = [int(j) for j in args.jobs.split(",") if j.strip()]

    tmp = Path(tempfile.mkdtemp(prefix="wsicodec-bench-batch-"))
    t = time.perf_counter()
    make_slides(tmp / "slides", args.slides, args.size)
    print(f"{args.slides} synthetic slides of {args.size}x{args.size * 4 // 5} px at 0.5 µm/px in "
          f"{time.perf_counter() - t:.1f} s; model {args.model or 'builtin'}; {os.cpu_count()} CPUs")
    # warm the page cache for the interpreter and torch, so the first run is not charged for it
    subprocess.run([sys.executable, "-c", "import wsicodec.pipeline.compress"], cwd=REPO, check=True)

    results = [run(tmp / "slides", tmp / f"out-jobs{j}", j, args.model, args.device) for j in jobs]
    base = results[0]["slides"] / results[0]["wall"]
    print(f"{'jobs':>4} {'backend':>10} {'slides':>6} {'tiles':>6} {'wall s':>8} {'slides/s':>9} {'speed-up':>9} "
          f"{'tree peak MiB':>14}  worker peaks MiB")
    for r in results:
        rate = r["slides"] / r["wall"]
        peaks = ", ".join(f"{p:.0f}" for p in r["worker_peaks_mib"])
        print(f"{r['jobs']:>4} {r['backend']:>10} {r['ok']:>6} {r['tiles']:>6} {r['wall']:>8.1f} {rate:>9.3f} "
              f"{rate / base:>8.2f}x {r['tree_peak_mib']:>14.0f}  {peaks}")
    print("(wall time includes starting the command and its workers" + (f"; outputs in {tmp})" if args.keep else ")"))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
