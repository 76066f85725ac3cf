"""run.sh: parses, documents itself and refuses bad arguments before doing any work. (The whole
pipeline takes minutes; it is run by hand: `./run.sh`, last line = the submission CSV.)"""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "run.sh"


def sh(*args):
    return subprocess.run([str(RUN), *args], capture_output=True, text=True, timeout=30)


def test_is_executable_strict_bash():
    assert os.access(RUN, os.X_OK)
    text = RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(RUN)]).returncode == 0


def test_help_and_bad_arguments():
    r = sh("--help")
    assert r.returncode == 0 and "--dataset" in r.stdout and "--ood-dir" in r.stdout
    for args, msg in [(("--bogus",), "unknown argument"), (("--parts", "4"), "--parts"),
                      (("--dataset", "imagefolder"), "needs --data"), (("--folds", "9"), "--folds"),
                      (("--dataset",), "needs a value")]:
        r = sh(*args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
