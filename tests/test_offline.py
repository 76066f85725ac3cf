"""Offline and network failures say what happened: Part 3 without weights on a machine without
internet is one message (pass weights=PATH) in seconds, not a minute of hub retries and a
traceback, and it leaves no run folder behind. No test here touches the network: the hub
download is replaced by what an offline machine raises, the connection attempt by a refusal."""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from competition import folds, models, train
from competition.files import CompetitionError

import background  # tests/background.py

ROOT = Path(__file__).resolve().parent.parent
PART3 = ["--part", "3", "--preset", "demo", "epochs=1", "train_subset=32"]


def offline_error():
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # older hub clients
        from huggingface_hub.utils import LocalEntryNotFoundError
    return LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot find "
                                   "the requested files in the local cache.")


@pytest.fixture()
def offline(monkeypatch):
    """A machine without internet and without cached weights. Returns the hub downloads attempted."""
    import huggingface_hub.constants
    import timm.models._hub as timm_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(models, "cached_hub_weights", lambda name: None)
    attempts = []

    def no_dns(address, *args, **kwargs):
        attempts.append(("connect", address))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_download(*args, **kwargs):
        attempts.append(("download", args, kwargs))
        raise offline_error()

    monkeypatch.setattr(socket, "create_connection", no_dns)
    monkeypatch.setattr(timm_hub, "hf_hub_download", no_download)
    return attempts


def test_hub_unreachable_is_one_short_try(offline):
    t0 = time.monotonic()
    why = models.hub_unreachable()
    assert time.monotonic() - t0 < 2
    assert "huggingface.co:443" in why and "Name or service not known" in why
    assert [a[0] for a in offline] == ["connect"]  # one try, no retries


def test_hub_unreachable_gives_up_on_a_silent_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    def silent(*args, **kwargs):  # a firewall that drops packets: the answer never comes in time
        time.sleep(3)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    t0 = time.monotonic()
    why = models.hub_unreachable(timeout=0.3)
    assert time.monotonic() - t0 < 2 and "did not answer within 0.3 s" in why


def test_hub_offline_setting_is_respected_without_a_connection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("HF_HUB_OFFLINE: no connection"))
    assert "HF_HUB_OFFLINE" in models.hub_unreachable()


def test_resnet50_offline_is_the_message_at_once(offline):
    t0 = time.monotonic()
    with pytest.raises(CompetitionError) as e:
        models.resnet50(10, pretrained=True)
    assert time.monotonic() - t0 < 10
    message = str(e.value)
    assert message.startswith("Part 3 needs ImageNet ResNet-50 weights: pass weights=PATH")
    assert "Name or service not known" in message
    assert not [a for a in offline if a[0] == "download"]  # the hub was never asked


def test_resnet50_failed_download_is_the_same_message(offline, monkeypatch):
    monkeypatch.setattr(models, "hub_unreachable", lambda timeout=models.HUB_PROBE_S: None)  # the hub answers ...
    with pytest.raises(CompetitionError, match=r"^Part 3 needs .* pass weights=PATH.*download failed: "
                                               r"LocalEntryNotFoundError"):
        models.resnet50(10, pretrained=True)  # ... but the download fails
    assert [a[0] for a in offline][:1] == ["download"]


def test_cached_hub_weights_need_no_network(offline, monkeypatch, random_resnet50):
    weights = random_resnet50  # models.save_random_resnet50's file (conftest.py), read only
    monkeypatch.setattr(models, "cached_hub_weights", lambda name: weights)
    model = models.resnet50(7, pretrained=True)
    assert model.fc.out_features == 7 and offline == []


def test_cached_hub_weights_finds_timms_file_in_the_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants
    from timm.models import get_pretrained_cfg

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.cached_hub_weights("resnet50") is None
    repo = get_pretrained_cfg("resnet50").hf_hub_id.split("@")[0]
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    assert models.cached_hub_weights("resnet50") == snapshot / "model.safetensors"


@pytest.fixture()
def dirs(tmp_path):
    from competition import data

    folds.write_folds(folds.folds_frame(np.asarray(data.load_digits().labels), k=5), tmp_path / "folds" / "digits.csv")
    return [f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'models'}"], tmp_path / "models"


def test_part3_offline_start_is_the_message(offline, dirs):
    args, _ = dirs
    with pytest.raises(CompetitionError, match="^Part 3 needs ImageNet ResNet-50 weights: pass weights=PATH"):
        train.main(PART3 + args)
    assert not [a for a in offline if a[0] == "download"]


def test_part3_offline_start_leaves_no_run_folder(offline, dirs):
    """A start that never trained leaves nothing, so the identical rerun says the same thing again
    (not 'holds a partial run: pass --resume')."""
    args, models_dir = dirs
    for _ in range(2):
        with pytest.raises(CompetitionError, match="pass weights=PATH"):
            train.main(PART3 + args)
        assert not models_dir.exists() or not any(models_dir.iterdir())


def launch_part3_offline(folder: Path) -> background.Started:
    """`python -m competition.train --part 3` offline with an empty hub cache; started with the
    session (conftest.py: start_early)."""
    from competition import data

    folds.write_folds(folds.folds_frame(np.asarray(data.load_digits().labels), k=5), folder / "folds" / "digits.csv")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf"), "HF_HUB_CACHE": str(folder / "hf"),
           "OMP_NUM_THREADS": "1"}
    return background.Started([sys.executable, "-m", "competition.train", *PART3, f"folds_dir={folder / 'folds'}",
                               f"models_dir={folder / 'models'}"], folder, timeout=180, cwd=ROOT, env=env)


@pytest.mark.start_early.with_args(launch_part3_offline)  # with_args: a lone function argument would be decorated
def test_part3_offline_command_line(early):
    """The entry point: the message on one line, no traceback, no hub retries (HF_HUB_OFFLINE
    keeps this test off the network; an empty cache keeps it from finding real weights)."""
    out = early.result()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Retrying" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: Part 3 needs ImageNet ResNet-50 weights: pass weights=PATH")
    assert "HF_HUB_OFFLINE" in errors[0]
