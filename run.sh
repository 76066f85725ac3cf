#!/usr/bin/env bash
# The whole pipeline, folds -> models -> TTA logits -> ensemble -> local score -> submission CSV.
#
#   ./run.sh                      # offline demo on CPU (minutes): embedded digits, parts 1-2,
#                                 # --preset demo (add Part 3: --parts 1,2,3 --weights FILE)
#   ./run.sh --dataset cifar100   # the competition: downloads CIFAR-100 and the 19 OOD files
#                                 # when online; trains parts 1-3 with their full presets
#   ./run.sh --dataset imagefolder --data PATH/cifar10-train.tar.gz \
#            --ood-dir DIR --parts 1,2 --folds 2 --preset demo
#
# Options (defaults in brackets):
#   --dataset digits|cifar100|cifar10|imagefolder [digits]   --data PATH (imagefolder)
#   --ood-dir DIR   the OOD files the submission is for [cifar100: data/ood-test; else the local suite]
#   --parts 1,2,3 [digits: 1,2; else 1,2,3]   --folds K: train folds 0..K-1 [1]   --k K: split size [5]
#   --preset NAME   added after part<N> [digits: demo; else none]
#   --weights PATH  Part 3 ImageNet ResNet-50 weights file (offline machines)
#   --measure-n N   training images reserved to measure the local estimate on (folds --measure-n;
#                   N or a share below 1) [cifar100 5000, imagefolder 0.1; digits, cifar10: 0, their
#                   test split measures]. 0 for the final submission: no local estimate then
#   --n N           local suite images per corruption and severity [digits 40, else 1000]
#   --tta NAME      predict's TTA [digits: shift (no mirror); else shift1]
#   --tta-adapt none|bn|tent|shot|eata|auto   test-time adaptation per OOD file and severity
#                   [auto: BN and TENT are predicted, and each member keeps whichever is best on
#                   its corrupted out-of-fold images; bn: cheap (one extra pass); tent, shot (entropy
#                   + diversity), eata (reliable predictions only): ~2-3x bn's, see competition/adapt.py]
#   --selftrain R   R rounds of pseudo-label self-training on the OOD files (needs --ood-dir) [0]
#   --name NAME     submission name, and the prefix of its run folders (NAME-part<P>-f<F>-s0)
#                   [submission <dataset>-<preset>-p<parts>; runs <preset>-<dataset>-f<F>-s0]
#   --retrain       retrain finished runs (train.py --force); the submission gets a new name
#   --overwrite     replace an existing submission of the same name instead
#   KEY=VALUE ...   config overrides for every training run (e.g. epochs=2 batch_size=64)
#
# Paths are relative to the directory you call it from. Everything the stages print goes to
# stderr; the LAST line (and the only one on stdout) is the absolute path of the submission
# CSV, so `csv=$(./run.sh ...)` works from anywhere.
set -euo pipefail
CALLER=$PWD
abspath() { [[ -z $1 || $1 == /* ]] && printf '%s' "$1" || printf '%s/%s' "$CALLER" "$1"; }
cd "$(dirname "$0")"

DATASET=digits DATA="" OOD_DIR="" PARTS="" FOLDS=1 K=5 PRESET=unset WEIGHTS="" N="" TTA="" NAME="" MEASURE_N=""
ADAPT=auto RETRAIN=0 OVERWRITE=0 SELFTRAIN=0 USER_OVERRIDES=()
PY=${PYTHON:-python}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
need() { [[ $# -ge 2 && -n $2 ]] || { echo "run.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --dataset) need "$@"; DATASET=$2; shift 2 ;;
    --data) need "$@"; DATA=$2; shift 2 ;;
    --ood-dir) need "$@"; OOD_DIR=$2; shift 2 ;;
    --parts) need "$@"; PARTS=$2; shift 2 ;;
    --folds) need "$@"; FOLDS=$2; shift 2 ;;
    --k) need "$@"; K=$2; shift 2 ;;
    --preset) need "$@"; PRESET=$2; shift 2 ;;
    --weights) need "$@"; WEIGHTS=$2; shift 2 ;;
    --n) need "$@"; N=$2; shift 2 ;;
    --measure-n) need "$@"; MEASURE_N=$2; shift 2 ;;
    --tta) need "$@"; TTA=$2; shift 2 ;;
    --name) need "$@"; NAME=$2; shift 2 ;;
    --bn-adapt) ADAPT=bn; shift ;;
    --tta-adapt) need "$@"; ADAPT=$2; shift 2 ;;
    --selftrain) need "$@"; SELFTRAIN=$2; shift 2 ;;
    --overwrite) OVERWRITE=1; shift ;;
    --retrain) RETRAIN=1; shift ;;
    -h|--help) usage 0 ;;
    *=*) [[ $1 == name=* ]] && { echo "run.sh: use --name NAME (run folders get NAME-part<P>-f<F>-s0)" >&2; exit 2; }
         USER_OVERRIDES+=("$1"); shift ;;
    *) echo "run.sh: unknown argument $1 (see ./run.sh --help)" >&2; exit 2 ;;
  esac
done

DATA=$(abspath "$DATA"); OOD_DIR=$(abspath "$OOD_DIR"); WEIGHTS=$(abspath "$WEIGHTS")
case $DATASET in
  digits) DSNAME=digits; [[ $PRESET == unset ]] && PRESET=demo; N=${N:-40}; TTA=${TTA:-shift}
          MEASURE_N=${MEASURE_N:-0} ;;
  cifar10) DSNAME=cifar10; [[ $PRESET == unset ]] && PRESET=""; N=${N:-1000}; TTA=${TTA:-shift1}
           MEASURE_N=${MEASURE_N:-0} ;;
  cifar100) DSNAME=cifar100; [[ $PRESET == unset ]] && PRESET=""; N=${N:-1000}; TTA=${TTA:-shift1}
            OOD_DIR=${OOD_DIR:-data/ood-test}; MEASURE_N=${MEASURE_N:-5000} ;;
  imagefolder) [[ -n $DATA ]] || { echo "run.sh: --dataset imagefolder needs --data PATH" >&2; exit 2; }
               b=$(basename "$DATA"); DSNAME=$(printf '%s' "${b%%.*}" | sed -E 's/[^A-Za-z0-9._-]+/-/g; s/^-+|-+$//g')
               DSNAME=${DSNAME:-images}; [[ $PRESET == unset ]] && PRESET=""
               N=${N:-1000}; TTA=${TTA:-shift1}; MEASURE_N=${MEASURE_N:-0.1} ;;
  *) echo "run.sh: --dataset must be digits, cifar100, cifar10 or imagefolder" >&2; exit 2 ;;
esac
# The demo leaves Part 3 out: an ImageNet ResNet-50 needs weights from the network, and one from
# random weights scores at chance while costing most of the demo's time (--parts 1,2,3 adds it).
[[ -n $PARTS ]] || { [[ $DATASET == digits ]] && PARTS=1,2 || PARTS=1,2,3; }
[[ $PARTS =~ ^[123](,[123])*$ ]] || { echo "run.sh: --parts must look like 1,2,3" >&2; exit 2; }
[[ $ADAPT =~ ^(none|bn|tent|shot|eata|auto)$ ]] || {
  echo "run.sh: --tta-adapt must be none, bn, tent, shot, eata or auto" >&2; exit 2; }
[[ $SELFTRAIN =~ ^[0-9]+$ ]] || { echo "run.sh: --selftrain takes a number of rounds" >&2; exit 2; }
[[ $SELFTRAIN == 0 || -n $OOD_DIR ]] || {
  echo "run.sh: --selftrain needs --ood-dir (the unlabelled test files to pseudo-label; the local suite measures)" >&2
  exit 2; }
[[ $FOLDS =~ ^[1-9][0-9]*$ && $FOLDS -le $K ]] || { echo "run.sh: --folds must be 1..$K" >&2; exit 2; }
RUN_PREFIX=$NAME
NAME=${NAME:-$DSNAME-${PRESET:-full}-p${PARTS//,/}}
[[ $NAME =~ ^[A-Za-z0-9._+-]+$ ]] || {
  echo "run.sh: --name '$NAME' must be letters, digits and . _ + - (it names files)" >&2; exit 2; }
SUITE=data/ood-local/$DSNAME-n$N  # images of the test split, or of the measure reserve (-m<size>-n<N>):
[[ $MEASURE_N == 0 ]] || SUITE=data/ood-local/$DSNAME-m$MEASURE_N-n$N  # never a suite of other images
DATA_ARGS=(); [[ -n $DATA ]] && DATA_ARGS=(--data "$DATA")
OVERRIDES=(dataset="$DATASET"); [[ -n $DATA ]] && OVERRIDES+=(data="$DATA")
OVERRIDES+=("${USER_OVERRIDES[@]}")

exec 3>&1 1>&2  # stage output to stderr; fd 3 keeps stdout for the CSV path
T0=$SECONDS
step() { printf '\n==== [%3ds] %s\n' $((SECONDS - T0)) "$*"; }

step "folds: $DSNAME, k=$K, measure reserve $MEASURE_N"
FOLDS_FORCE=(); [[ $RETRAIN == 1 ]] && FOLDS_FORCE=(--force)  # a new split: every run is retrained anyway
$PY -m competition.folds --dataset "$DATASET" "${DATA_ARGS[@]}" --k "$K" --measure-n "$MEASURE_N" "${FOLDS_FORCE[@]}"

RUNS=()
for P in ${PARTS//,/ }; do
  EXTRA=()
  if [[ $P == 3 ]]; then
    if [[ -n $WEIGHTS ]]; then
      EXTRA=(weights="$WEIGHTS")
    elif [[ $DATASET == digits ]]; then
      WEIGHTS=models/random-resnet50.pth
      [[ -f $WEIGHTS ]] || $PY -m competition.models --random-resnet50 "$WEIGHTS"
      echo "NOTE: Part 3 starts from $WEIGHTS, a RANDOMLY INITIALISED ResNet-50 saved locally so the demo"
      echo "      runs offline. It is NOT ImageNet-pretrained; pass --weights PATH for real weights."
      EXTRA=(weights="$WEIGHTS")
    fi
  fi
  # The run folder train.py makes (runs.run_name): <presets>-<dataset>-f<fold>-s<seed>, or --name's.
  if [[ -z $PRESET ]]; then RUN=part$P; PRESET_ARGS=()
  elif [[ $PRESET == part$P* ]]; then RUN=$PRESET; PRESET_ARGS=(--preset "$PRESET")
  else RUN=part$P-$PRESET; PRESET_ARGS=(--preset "$PRESET"); fi
  RUN=$RUN-$DSNAME
  for ((F = 0; F < FOLDS; F++)); do
    DIR=models/$RUN-f$F-s0; NAMED=()
    [[ -n $RUN_PREFIX ]] && { DIR=models/$RUN_PREFIX-part$P-f$F-s0; NAMED=(name="$RUN_PREFIX-part$P-f$F-s0"); }
    RUNS+=("$DIR")
    # train.py itself skips a finished run with the same config (and refuses a changed one).
    step "train part $P fold $F -> $DIR"
    FORCE=(); [[ $RETRAIN == 1 ]] && FORCE=(--force)
    $PY competition/train.py --part "$P" "${PRESET_ARGS[@]}" --fold "$F" "${FORCE[@]}" \
      "${OVERRIDES[@]}" "${EXTRA[@]}" "${NAMED[@]}"
  done
done

# CIFAR-100 without a measure reserve (the final submission): no honest local estimate exists (its
# test split is the leaderboard's), so there is no suite to predict or score.
if [[ $DATASET == cifar100 && $MEASURE_N == 0 ]]; then
  SUITE=""
  echo "no measure reserve (--measure-n 0): no local estimate this time; the choices are made on out-of-fold images"
else
  step "local OOD suite: $SUITE ($N held-out images x 19 corruptions x 5 severities)"
  $PY -m competition.score suite --out "$SUITE" --dataset "$DATASET" "${DATA_ARGS[@]}" --n "$N"
fi

OOD_ARGS=(); [[ -n $SUITE ]] && OOD_ARGS=(--ood-dir "$SUITE")
TARGET=$SUITE
if [[ -n $OOD_DIR ]]; then
  OOD_ARGS+=(--ood-dir "$OOD_DIR")
  TARGET=$OOD_DIR
  [[ $DATASET == cifar100 ]] && OOD_ARGS+=(--download)
else
  echo "no --ood-dir: the submission is made for the local suite $SUITE (a stand-in for the real OOD files)"
fi
case $ADAPT in none) PADAPT=() ;; auto) PADAPT=(--adapt bn,tent) ;; *) PADAPT=(--adapt "$ADAPT") ;; esac
step "predict ${#RUNS[@]} run(s) with TTA $TTA (adapted copies: ${PADAPT[*]:-none}): clean test, out-of-fold, OOD"
$PY -m competition.predict "${RUNS[@]}" "${OOD_ARGS[@]}" --tta "$TTA" "${PADAPT[@]}"
# No TTA on the suite too, for the table of what each stage adds (cheap: one view).
[[ -z $SUITE ]] || $PY -m competition.predict "${RUNS[@]}" --ood-dir "$SUITE" --tta none --no-test --no-oof

# A finished submission is never overwritten: a rerun with the same runs is left alone, and
# --retrain (new weights) writes NAME-2, NAME-3, ... unless --overwrite.
SUB=$NAME
if [[ $RETRAIN == 1 && $OVERWRITE == 0 ]]; then
  i=2; while [[ -e submissions/$SUB.csv ]]; do SUB=$NAME-$i; i=$((i + 1)); done
fi
OVER=(); [[ $OVERWRITE == 1 ]] && OVER=(--overwrite)
step "ensemble -> submissions/$SUB.csv (weights and adaptation chosen on out-of-fold images; adaptation: $ADAPT)"
$PY -m competition.ensemble "${RUNS[@]}" --name "$SUB" --ood-dir "$TARGET" --tta "$TTA" --adapt "$ADAPT" \
  "${OVER[@]}"

if [[ $SELFTRAIN -gt 0 ]]; then
  step "self-training: $SELFTRAIN round(s) on the pseudo-labelled $TARGET"
  ST_FORCE=(); [[ $OVERWRITE == 1 ]] && ST_FORCE=(--force)
  ST_SUITE=(); [[ -n $SUITE ]] && ST_SUITE=(--suite "$SUITE")
  $PY -m competition.selftrain "submissions/$SUB.json" --rounds "$SELFTRAIN" "${ST_SUITE[@]}" "${ST_FORCE[@]}"
  SUB=$SUB-st$SELFTRAIN
fi

if [[ -n $SUITE ]]; then
  step "local score on $SUITE"
  $PY -m competition.score "${RUNS[@]}" --ood-dir "$SUITE" --tta "$TTA"
  for A in ${PADAPT[1]:+${PADAPT[1]//,/ }}; do  # the adapted copies too: the board's "local OOD adapted" column
    $PY -m competition.score "${RUNS[@]}" --ood-dir "$SUITE" --tta "$TTA" --adapt "$A"
  done
  $PY -m competition.score "submissions/$SUB.json" --ood-dir "$SUITE"
  $PY -m competition.board --stages "submissions/$SUB.json" --suite "$SUITE"
fi

[[ $PARTS == *3* ]] || echo "Part 3 (ImageNet-pretrained ResNet-50) was left out: add it with --parts 1,2,3 and \
--weights resnet50.pth (README: The real competition), or online with --dataset cifar100"
step "done in $((SECONDS - T0)) s; submission (validated against $TARGET):"
echo "$PWD/submissions/$SUB.csv" >&3
