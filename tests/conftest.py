"""Every test process and the processes it starts compute in fp32 on any CPU: `auto` would pick
bf16 on CPUs with native bf16 (runtime.cpu_has_bf16), and the tests' tolerances are fp32's.
Tests of the bf16 paths ask for bf16 by name.

Shared here, built once per session (never written by a test: checked when the session ends):
`tiny_run`, one finished tiny Part 1 run for the tests that read a trained run or work on a copy
of it (`tiny_run_copy`), `uninterrupted_run`, the run the stop-and-resume tests compare with, and
`random_resnet50`, a weights file. And the `start_early` marker
(tests/background.py): a test's long subprocess starts when the session starts, not when the
test comes up, so it runs beside the in-process tests; the tests that wait on one run last.

Tests start Python as sys.executable, never `python` from PATH (run.sh: PYTHON=; scripts that
call `python` themselves: background.python_on_path)."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["COMPETITION_CPU_BF16"] = "0"

# The cores' share, decided once for the session (competition/__init__.py): beside another job the
# tests and every process they start compute on the free cores only, and say so once, here.
import competition  # noqa: E402,F401

import background  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative imports)

# A finished Part 1 run in seconds: the demo preset (digits, ood_check, noise/blur) on 128 images,
# 2 epochs (two checkpoints: resume can fall back), a narrow CNN.
TINY_RUN = ["--part", "1", "--preset", "demo", "epochs=2", "train_subset=128", "model_args.widths=[8,16,16]",
            "model_args.hidden=16"]


def _files(root: Path) -> dict:
    """Every file under root with its size and modification time: what a test that wrote into a
    shared fixture would change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run folder, its train arguments without the folders): a finished TINY_RUN under
    <root>/models, its folds under <root>/folds. Shared by every test of the session: read it,
    or work on `tiny_run_copy` before changing anything in it (checked when the session ends)."""
    from competition import train

    root = tmp_path_factory.mktemp("tiny-run")
    run_dir = train.main(TINY_RUN + [f"folds_dir={root / 'folds'}", f"models_dir={root / 'models'}"])
    before = _files(root)
    yield run_dir, list(TINY_RUN)
    assert _files(root) == before, "a test wrote into the session's tiny run: work on tiny_run_copy"


# The run the stop-and-resume tests compare with (test_train, test_safety): 3 epochs of 256 images
# in batches of 64 (4 steps an epoch) with EMA, mixup and random erasing, on 7 folds (test_train:
# the held-out fold, 206 images, is not a multiple of the batch).
EXACT_RUN = ["--part", "1", "--preset", "demo", "epochs=3", "train_subset=256", "batch_size=64", "ema=0.9",
             "mixup=0.2", "random_erasing=0.3", "model_args.widths=[8,16,16]", "model_args.hidden=16"]


def seven_folds(folds_dir: Path) -> str:
    """folds_dir/digits.csv with 7 folds; returns the folds_dir= argument."""
    import numpy as np

    from competition import data, folds

    folds.write_folds(folds.folds_frame(np.asarray(data.load_digits().labels), k=7), folds_dir / "digits.csv")
    return f"folds_dir={folds_dir}"


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """(run folder, EXACT_RUN + the folds_dir= argument of its 7 folds): EXACT_RUN trained without a
    stop, once per session, for the tests that stop or resume the same run elsewhere (their own
    models_dir, these folds) and compare. Read it only (checked when the session ends)."""
    from competition import train

    root = tmp_path_factory.mktemp("uninterrupted")
    args = EXACT_RUN + [seven_folds(root / "folds")]
    run_dir = train.main(args + ["--name", "full", f"models_dir={root / 'models'}"])
    before = _files(root)
    yield run_dir, args
    assert _files(root) == before, "a test wrote into the session's uninterrupted run or its folds"


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """A private copy of the shared run in tmp_path / "w": (run folder, train arguments that address it)."""
    src, args = tiny_run
    shutil.copytree(src.parent.parent, tmp_path / "w")
    return tmp_path / "w" / "models" / src.name, args + [f"folds_dir={tmp_path / 'w' / 'folds'}",
                                                        f"models_dir={tmp_path / 'w' / 'models'}"]


@pytest.fixture(scope="session")
def smooth_images():
    """12 smooth random 32x32 scenes, uint8: edges and flat regions, as in photographs (white noise
    would make blur-like or sharpening corruptions meaningless), for the corruption generators' tests."""
    import cv2
    import numpy as np

    raw = np.random.default_rng(0).uniform(0, 255, (12, 32, 32, 3)).astype(np.float32)
    return np.clip(np.stack([cv2.GaussianBlur(im, (0, 0), 2.0) * 2 - 128 for im in raw]), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def random_resnet50(tmp_path_factory) -> Path:
    """models.save_random_resnet50's file: a randomly initialised ResNet-50 with the 1000-class
    ImageNet head saved as a plain state dict, the form of a real weights file
    (`torch.save(timm.create_model("resnet50", pretrained=True).state_dict(), path)`). Saved once
    per session: read it, never write it (checked when the session ends)."""
    from competition import models

    path = models.save_random_resnet50(tmp_path_factory.mktemp("weights") / "resnet50.pth")
    before = _files(path.parent)
    yield path
    assert _files(path.parent) == before, "a test wrote beside or into the session's random_resnet50 file"


# ---------------------------------------------------------------------------- start_early

EARLY = pytest.StashKey[object]()  # the Started, or what the launcher raised (the test reports it)
_EARLY_ROOT: list[Path] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "start_early(launch, shared=False): launch(folder) -> background.Started "
                                       "starts the test's long subprocess when the session starts; the test gets "
                                       "it from the `early` fixture (tests/background.py) and runs after the tests "
                                       "without one. shared=True: one process for every selected test with that "
                                       "launcher, launch(folder, items). Write it "
                                       "@pytest.mark.start_early.with_args(launch): a lone function argument "
                                       "would be taken for the decorated test")


def _launch(launch, folder: Path, items=None):
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return launch(folder) if items is None else launch(folder, items)
    except Exception as e:  # raised in the test, not as a session error
        return e


def pytest_collection_modifyitems(items):
    """Tests that wait on a start_early process run after the others, in their own order: their
    processes then have the whole session to finish beside the in-process tests, instead of the
    session stopping for them halfway (the GPU check's dry run alone takes most of a minute)."""
    items.sort(key=lambda item: item.get_closest_marker("start_early") is not None)


def pytest_collection_finish(session):
    """Start the long subprocess of every selected test marked start_early, now: one per test, or
    one per shared launcher for all its tests."""
    if session.config.option.collectonly:
        return
    shared = {}
    for item in session.items:
        marker = item.get_closest_marker("start_early")
        if marker is None:
            continue
        if not _EARLY_ROOT:
            _EARLY_ROOT.append(Path(tempfile.mkdtemp(prefix="pytest-early-")))
        if marker.kwargs.get("shared"):
            shared.setdefault(marker.args[0], []).append(item)
        else:
            item.stash[EARLY] = _launch(marker.args[0], _EARLY_ROOT[0] / item.name)
    for launch, items in shared.items():
        started = _launch(launch, _EARLY_ROOT[0] / launch.__name__, items)
        for item in items:
            item.stash[EARLY] = started


@pytest.fixture
def early(request, tmp_path):
    """The test's background.Started: the one started with the session, else (no collection hook
    ran for this item, e.g. a plugin re-running it) one started now. Killed after the test if still
    running; a shared one at the end of the session (its other tests may still need it)."""
    marker = request.node.get_closest_marker("start_early")
    shared = bool(marker.kwargs.get("shared"))
    started = request.node.stash.get(EARLY, None) or _launch(marker.args[0], tmp_path / "early",
                                                             [request.node] if shared else None)
    if isinstance(started, Exception):
        raise started
    yield started
    if not shared:
        started.kill()


def pytest_sessionfinish(session):
    for started in background.LIVE:
        started.kill()
    for root in _EARLY_ROOT:
        shutil.rmtree(root, ignore_errors=True)
