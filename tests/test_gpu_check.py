"""bench/gpu_check.sh --dry-run: every step of the GPU check runs on tiny sizes on a CPU, so the
script a GPU session gets is known to work before the GPU time is spent."""
from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import background  # tests/background.py

ROOT = Path(__file__).resolve().parent.parent


def tiny_tarball(path: Path, classes: int = 10, per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for c in range(classes):
            for i in range(per_class):
                im = np.clip(rng.normal(25 * c, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"train/class{c}/{i}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return path


def launch_dry_run(folder: Path) -> background.Started:
    """bash bench/gpu_check.sh TINY --dry-run, with this interpreter as the `python` it calls; started
    when the session starts (conftest.py: start_early): a minute of one thread, beside the others."""
    data = tiny_tarball(folder / "tiny.tar.gz")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": background.python_on_path(folder / "bin")}
    return background.Started(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(data), "--dry-run", "--out",
                               str(folder / "gpu.md"), "--work", str(folder / "work"), "--augmix-epochs", "1"],
                              folder, timeout=600, env=env)


@pytest.mark.start_early.with_args(launch_dry_run)  # with_args: a lone function argument would be decorated
def test_gpu_check_dry_run_exercises_every_step(early):
    proc = early.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (early.folder / "gpu.md").read_text()
    assert "DRY RUN" in text and "FAILED" not in text
    for step in ("throughput", "part2_94", "airbench", "predict950k", "ddp", "augmix_pair"):
        assert f"## {step} (" in text, step
    assert "| part3 | 32 |" in text and "| part3 (train size) | 32 |" in text
    assert "380 images (19 files x 20)" in text  # the competition's layout, 20 rows per file
    assert (early.folder / "work" / "airbench" / "cifar10" / "train.pt").exists()  # airbench's files were written


def launch_list_wheels(folder: Path) -> background.Started:
    return background.Started([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--list-wheels"], folder,
                              timeout=120)


@pytest.mark.start_early.with_args(launch_list_wheels)
def test_the_offline_wheel_list_has_the_project_needs_and_not_torch(early):
    out = early.result()
    names = {line.split("==")[0].lower() for line in out.stdout.split()}
    assert {"timm", "accelerate", "albumentations", "pandas", "imagecorruptions"} <= names
    assert not names & {"torch", "torchvision", "triton"} and not any(n.startswith("nvidia-") for n in names)
