#!/usr/bin/env bash
# The whole pipeline, folds -> models -> TTA logits -> ensemble -> local score -> submission CSV.
# It is `python -m competition.pipeline`; `./run.sh --help` lists every option.
#
#   ./run.sh                      # offline demo on CPU (minutes): embedded digits, parts 1-2,
#                                 # --preset demo (add Part 3: --parts 1,2,3 --weights FILE)
#   ./run.sh --dataset cifar100   # the competition: downloads CIFAR-100 and the 19 OOD files
#                                 # when online; trains parts 1-3 with their full presets
#   ./run.sh --dataset imagefolder --data PATH/cifar10-train.tar.gz \
#            --ood-dir DIR --parts 1,2 --folds 2 --preset demo
#   ./run.sh --dry-run ...        # print the stage commands, run nothing
#
# Paths are relative to the directory you call it from. Everything the stages print goes to
# stderr; the LAST line (and the only one on stdout) is the absolute path of the submission
# CSV, so `csv=$(./run.sh ...)` works from anywhere. PYTHON=... picks the interpreter.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m competition.pipeline "$@"
