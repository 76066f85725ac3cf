"""Benchmark: load an image-folder archive cold (decode every JPEG), then again from the .npz cache.

    python bench/data_load.py                        # ../shared/data/cifar10-jpg-train.tar.gz, cache in a temp dir
    python bench/data_load.py --data PATH.tar.gz --data-dir DIR   # DIR/cache must not hold this archive's cache yet

Each load runs in a fresh process, so each peak RSS is that load's own (ru_maxrss only
ever grows) and the cached load cannot borrow anything from the cold one but the file.
`import only` is a process that imports competition.data and loads nothing: the floor.

Measured 2025-11-29 (three runs), 2 CPU cores shared with a training job, Python 3.11.7,
numpy 2.4.6, Pillow 13.0; CIFAR-10 train as 50,000 32x32 JPEGs in a 16 MB .tar.gz:

    phase          seconds      peak RSS MiB   images
    import only    0.22-0.23          35          -
    cold (decode)  9.8-14.1          440       50,000
    cached (.npz)  0.16-0.2          183       50,000

The cache makes the second load 58-89x faster. Cached peak = the floor + the (50000, 32, 32, 3)
uint8 array (146 MiB). The cold peak is ~3x the array: the archive's encoded bytes, the
list of 50,000 decoded images and the stacked array are all alive at np.stack.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "cifar10-jpg-train.tar.gz"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def phase(kind: str, data_path: str, data_dir: str) -> dict:
    """One measurement, run in this (fresh) process."""
    t0 = time.perf_counter()
    from competition import data

    if kind == "import":
        return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), "images": None}
    t0 = time.perf_counter()
    ds = data.load("imagefolder", "train", data_dir=data_dir, path=data_path)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "images": len(ds.images),
            "shape": list(ds.images.shape), "classes": len(ds.classes), "mib": ds.images.nbytes / 2**20}


def run_phase(kind: str, data_path: Path, data_dir: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", kind, "--data", str(data_path),
                          "--data-dir", str(data_dir)], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder or .tar.gz of [train/]<class>/<image>")
    p.add_argument("--data-dir", default=None, help="where data.load puts its cache/ (default: a temp dir)")
    p.add_argument("--phase", choices=["import", "cold", "cached"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:  # child process: one measurement, one JSON line
        print(json.dumps(phase(args.phase, args.data, args.data_dir)))
        return

    data_path = Path(args.data).resolve()
    if not data_path.exists():
        sys.exit(f"error: {data_path} does not exist (pass --data)")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data_dir = Path(args.data_dir or tmp).resolve()
        stale = list((data_dir / "cache").glob(f"{data_path.name.split('.')[0]}-train-*.npz"))
        if stale:
            sys.exit(f"error: {stale[0]} exists, so the first load would not be cold; "
                     f"use another --data-dir or delete it")
        rows = [("import only", run_phase("import", data_path, data_dir)),
                ("cold (decode)", run_phase("cold", data_path, data_dir)),
                ("cached (.npz)", run_phase("cached", data_path, data_dir))]
    print(f"{data_path.name}: {rows[1][1]['shape']} uint8 ({rows[1][1]['mib']:.0f} MiB), "
          f"{rows[1][1]['classes']} classes")
    print(f"{'phase':<15}{'seconds':>8}{'peak RSS MiB':>15}{'images':>9}")
    for name, r in rows:
        images = f"{r['images']:,}" if r["images"] else "-"
        print(f"{name:<15}{r['seconds']:>8.2f}{r['peak_rss_mib']:>15.0f}{images:>9}")
    print(f"cache speed-up: {rows[1][1]['seconds'] / rows[2][1]['seconds']:.0f}x")


if __name__ == "__main__":
    main()
