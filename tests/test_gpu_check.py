"""bench/gpu_check.sh --dry-run: every step of the GPU check runs on tiny sizes on a CPU, so the
script a GPU session gets is known to work before the GPU time is spent."""
from __future__ import annotations

import importlib.util
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
                              folder, timeout=600, env=env, beside=True)


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


def test_the_offline_wheel_list_has_the_project_needs_and_not_torch(monkeypatch, capsys):
    """`python bench/gpu_check.py --list-wheels`, what `gpu_check.sh --download-wheels` reads: its
    main() in this process (the script's own process is the dry run's above)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repository first on it
    monkeypatch.setattr(sys, "argv", [spec.origin, "--list-wheels"])
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main() == 0
    names = {line.split("==")[0].lower() for line in capsys.readouterr().out.split()}
    assert {"timm", "accelerate", "albumentations", "pandas", "imagecorruptions"} <= names
    assert not names & {"torch", "torchvision", "triton"} and not any(n.startswith("nvidia-") for n in names)
