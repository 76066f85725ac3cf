"""Stage 4b: pseudo-label self-training on the unlabelled OOD files, between ensemble and submit.

    python -m competition.selftrain submissions/p23.json --rounds 2
    python -m competition.selftrain submissions/demo.json --rounds 1 --threshold 0.8 --suite data/ood-local/x

Each round: (1) the submission's ensembled (and, as it recorded, adapted) predictions on its
OOD files; (2) the confident rows (top probability >= --threshold), at most --per-class per
predicted class so the classes stay balanced, as soft targets (the ensemble's probabilities);
(3) every member run fine-tuned from its best.pt on its own training folds plus those images,
through competition/train.py's loop (config keys init_from and pseudo; its held-out fold is
untouched, so out-of-fold figures stay honest), each a new run folder <run>-<submission>-st<round>;
(4) predicted and ensembled again with the same settings, as submissions/<name>-st<round>.

It refuses a pseudo-label set that contains a member's held-out images (a local suite made from
that fold: the choose images) or the measure reserve, and a local suite to measure on (--suite)
that holds copies of the pseudo-labelled images (it would score what it trained on): the same
rows of the training split, or CIFAR-100's test split against the competition's files, which
are that split corrupted. Its own thresholds are fixed defaults (measured once, bench/NOTES.md),
never tuned on the suite.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from competition import data, ensemble, folds, predict, score, train
from competition.config import NOT_COMPARED, base_config, complete
from competition.files import CompetitionError, check_inside, cli, count, read_json, save_json
from competition.metrics import softmax
from competition.runs import RunDir, adaptation, base_setting, members_from_json, ood_logits, parse_adaptation, \
    recorded_post
from competition.specs import EnsembleSpec, PredictSpec

# Defaults measured on the stand-in (bench/NOTES.md, test-time learning, fifth sitting): five
# part1_cpu members on 40,000 labelled images, a pool of 2,000 distinct images x 95 corruptions.
# Fine-tuning at 0.3x the members' own peak lr for 3 epochs on pseudo-labels >= 0.8, capped at
# half the labelled images, gained +0.4 OOD over two rounds where 80,000 uncapped pseudo-labels
# at that lr lost a point (they outweigh the labelled data 2:1 and pull the members off it).
# Relative to the members, not absolute, so a ResNet trained at lr 0.2 or fine-tuned at 0.05
# gets the same treatment as the 0.1 CPU model it was measured on.
LR_FRACTION = 0.3
PSEUDO_FRACTION = 0.5


def select(probs: np.ndarray, threshold: float, per_class: int | None) -> np.ndarray:
    """Rows to pseudo-label: top probability >= threshold, at most per_class of each predicted
    class (the most confident first; default: 1.5x the median class count, so no class
    swamps the rest)."""
    top, pred = probs.max(1), probs.argmax(1)
    keep = np.flatnonzero(top >= threshold)
    counts = np.bincount(pred[keep], minlength=probs.shape[1])
    cap = per_class or max(1, int(1.5 * np.median(counts[counts > 0]))) if len(keep) else 0
    out = []
    for c in range(probs.shape[1]):
        rows = keep[pred[keep] == c]
        out.append(rows[np.argsort(-top[rows], kind="stable")[:cap]])
    return np.sort(np.concatenate(out)) if out else keep


def suite_rows(ood: data.OodSet) -> set[int] | None:
    """Rows of the training split a local suite's images are copies of (None: not from it)."""
    info = ood.info()
    return set(info.get("source_rows") or []) if info.get("split") in ("train", "measure") else None


def pool_info(ood: data.OodSet) -> dict:
    """Where the pseudo-label pool's images come from, kept in the pseudo-label report so that a
    later leak check knows them even if the pool's folder is gone."""
    info = ood.info()
    return {k: info[k] for k in ("dataset", "split", "fold", "reserve", "source_rows") if k in info}


def pseudo_set(spec_path: Path, threshold: float, per_class: int | None, max_images: int | None,
               models_dir=None):
    """(images, soft targets, report) from a submission's ensembled OOD predictions. max_images
    None: PSEUDO_FRACTION of the fewest labelled images a member trained on; 0: no cap. Every
    member run must lie inside models_dir (default: base.yaml's), see check_members."""
    members, weights, spec = members_from_json(spec_path)
    check_spec(spec, spec_path)
    check_members(members, spec_path, base_config()["models_dir"] if models_dir is None else models_dir)
    if max_images is None:
        max_images = int(PSEUDO_FRACTION * min(labelled_images(source_run(r)) for m in members for r in m.runs))
    ood = data.OodSet(spec["ood_dir"])
    if ood.info().get("split") == "measure":
        raise CompetitionError(f"{ood.path} is made of the measure reserve: pseudo-labelling it would train on the "
                               f"images the local estimate is measured on; pseudo-label the competition's files or a "
                               f"pool from other images")
    for m in members:  # never the held-out fold's images: the OOF figures would no longer be honest
        src = suite_rows(ood)
        for run in m.runs:
            held = run.oof_index()
            if src and held is not None and src & set(held.tolist()):
                raise CompetitionError(f"{ood.path} is made of images {run} holds out (its fold {run.config()['fold']}):"
                                       f" pseudo-labelling them would train on the held-out fold; use OOD images "
                                       f"from outside it (e.g. a suite of a fold the runs exclude: exclude_folds)")
    images, probs, right = [], [], []
    truth = None if ood.labels is None else np.tile(ood.labels, data.SEVERITIES)
    for k, (_, z) in enumerate(ood_logits(members, weights, ood, **recorded_post(spec))):
        p = softmax(z)
        rows = select(p, threshold, per_class)
        images.append(np.asarray(ood.images(k)[rows]))
        probs.append(p[rows].astype(np.float32))
        if truth is not None:  # a labelled local suite: how right the pseudo-labels are (never used to train)
            right.append(p[rows].argmax(1) == truth[rows])
    images, probs = np.concatenate(images), np.concatenate(probs)
    right = np.concatenate(right) if right else None
    if max_images and len(images) > max_images:  # a seeded sample: the real test set has 950,000 rows
        keep = data.sample_rows(len(images), max_images, 0)
        images, probs = images[keep], probs[keep]
        right = None if right is None else right[keep]
    if not len(images):
        raise CompetitionError(f"no OOD image reaches confidence {threshold}: lower --threshold")
    rep = {"images": int(len(images)), "of": int(sum(ood.rows)), "threshold": threshold, "max_images": max_images,
           "per_class": np.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist(),
           "mean_confidence": float(probs.max(1).mean()), "ood_dir": str(ood.path),
           "source_rows": sorted(suite_rows(ood) or []), "pool": pool_info(ood)}
    if right is not None:
        rep["pseudo_label_accuracy"] = float(right.mean())
    return members, spec, images, probs, rep


# What self-training reads of a submission's JSON besides its members, and the types it needs:
# members_from_json serves board and score too, which need no name; self-training names its runs
# and files after it and reads the rest, so a hand-made, older or edited JSON fails here, unwritten.
SPEC_KEYS = {"name": str, "ood_dir": str, "method": str}
SPEC_OPTIONAL = {"rounds": (int, type(None)), "fit_on": str, "adaptation": (str, dict), "selftrain": dict,
                 "balance": bool, "copies": bool, "copies_found": dict}


def check_spec(spec: dict, path: Path) -> None:
    """One error naming the JSON and the key when a key self-training reads is absent or of another type."""
    missing = [key for key in SPEC_KEYS if key not in spec]
    if missing:
        raise CompetitionError(f"{path} lacks {', '.join(map(repr, missing))}: self-training reads the JSON "
                               f"competition.ensemble writes next to its CSV; rebuild it with competition.ensemble "
                               f"(or add the key)")
    for key, kind in {**SPEC_KEYS, **SPEC_OPTIONAL}.items():
        if key in spec and ((isinstance(spec[key], bool) and kind is not bool) or not isinstance(spec[key], kind)):
            raise CompetitionError(f"{path}: {key!r} is {json.dumps(spec[key])[:60]}, not what competition.ensemble "
                                   f"writes there; rebuild the JSON with competition.ensemble (or restore it)")


def check_members(members, path: Path, models_dir) -> None:
    """Every member run inside the project's models folder, before anything is written: a round
    writes each fine-tuned run beside its member (fine_tune), so a submission JSON someone sent
    that names a run elsewhere (an absolute path, ../) would have it write there."""
    for run in (r for m in members for r in m.runs):
        try:
            check_inside(run.path, models_dir, f"{run} (a member run)")
        except CompetitionError:
            raise CompetitionError(f"{path}: member run {run.path} does not lie inside the models folder "
                                   f"{Path(models_dir).resolve()}, and self-training writes each fine-tuned run "
                                   f"beside its member: copy the run into it and rebuild the JSON with "
                                   f"competition.ensemble, or pass --models-dir FOLDER that holds it; nothing was "
                                   f"written") from None


def previous_round(path: Path) -> int:
    """The self-training round a submission's JSON records (0: none), checked before any round
    starts: each new round is numbered after it."""
    spec = read_json(path, kind=dict)
    if spec is None:
        if path.exists():
            raise CompetitionError(f"{path} is not a JSON mapping: self-training reads the JSON competition.ensemble "
                                   f"writes next to its CSV; rebuild it with competition.ensemble")
        return 0  # members_from_json says it is missing
    record = spec.get("selftrain", {})
    done = record.get("round", 0) if isinstance(record, dict) else None
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= 1000:
        raise CompetitionError(f"{path}: 'selftrain' is {json.dumps(record)[:60]}, not the record competition."
                               f"selftrain writes ({{\"round\": N, ...}} with a whole round number); rebuild the JSON "
                               f"with competition.ensemble, or restore it")
    return done


def folds_csv(run: RunDir) -> Path:
    """The folds file `run` trained on, which must exist: training would write a new split there
    (another held-out fold) if it were missing."""
    cfg = run.config()
    path = folds.folds_path(folds.dataset_name(cfg["dataset"], cfg.get("data")), cfg["folds_dir"])
    if not path.is_file():
        raise CompetitionError(f"{path} (the folds {run} trained on) is missing: restore it (fine-tuning on another "
                               f"split would train on the run's held-out images)")
    return path


def source_run(run: RunDir) -> RunDir:
    """The run a self-trained run descends from (itself when it is not one): its lr and its
    training images are the reference for every round's defaults."""
    seen = set()
    while run.config().get("pseudo") and run.config().get("init_from") and run.path not in seen:
        seen.add(run.path)
        run = RunDir(run.config()["init_from"])
    return run


def labelled_images(run: RunDir) -> int:
    """How many labelled images `run` trained on: its folds file's training rows (its fold and
    exclude_folds left out), at most train_subset."""
    cfg, path = run.config(), folds_csv(run)
    rows, _ = folds.fold_rows(folds.read_folds(path)["fold"].to_numpy(), cfg["fold"], path, cfg.get("exclude_folds"))
    return min(len(rows), cfg.get("train_subset") or len(rows))  # train samples train_subset of them


def member_predict_spec(setting: str, record: dict) -> PredictSpec:
    """How a fine-tuned member is predicted: as the member it replaces was (its setting's TTA,
    averaging and adaptation, a learned one with the steps, lr and batch its predict.json
    recorded), so a round changes the weights and nothing else."""
    part = adaptation(setting)
    if part == "none":
        return PredictSpec(record.get("tta", "flip"), average=record.get("average", "logits"))
    how, params, alpha, blend = parse_adaptation(part)
    keys = {"steps": "learn_steps", "lr": "learn_lr", "batch": "learn_batch", "guard": "collapse_tol",
            "disagree": "max_disagree"}  # predict.json's {objective}_{key} -> PredictSpec's field
    learned = {field: record[f"{how}_{k}"] for k, field in keys.items() if f"{how}_{k}" in record}
    return PredictSpec(record.get("tta", "flip"), average=record.get("average", "logits"), adapts=[how],
                       bn_blend=blend, learn_params=params, learn_ensemble=alpha, **learned)


# Keys a fine-tune takes from base.yaml, never from the run's config.yaml (a run someone sent may
# carry any): how a run is run, not what it learns (config.NOT_COMPARED: log_with would start that
# tracker, e.g. wandb, from here; data_dir would write elsewhere), less folds_dir (the folds the
# run trained on, only read; folds_csv checks them); and where its starting weights come from
# (pretrained: a download from the hub; weights: a file anywhere), which init_from replaces whole.
LOCAL_KEYS = (NOT_COMPARED - {"folds_dir"}) | {"pretrained", "weights"}


def fine_tune(run: RunDir, pseudo: Path, chain: str, round_: int, epochs: int, lr: float | None,
              force: bool) -> RunDir:
    """The run fine-tuned on its training folds + the pseudo-labelled images: a new run folder,
    <run>-<submission>-st<round> beside it (round 2 continues from round 1's run, named after the
    original). lr None: LR_FRACTION of the original run's peak lr."""
    base = re.sub(rf"-{re.escape(chain)}-st\d+$", "", run.name)
    lr = lr if lr is not None else LR_FRACTION * float(source_run(run).config()["lr"])
    folds_csv(run)
    # complete: a run saved before some key existed trains with its default, as config.comparable reads it.
    # models_dir: the folder the run lies in, so the new run (and what --force replaces) is its sibling;
    # the run's own config may name any folder (a run someone sent), and data_dir is the project's (RunDir.config).
    # LOCAL_KEYS (how a run is run, log_with's tracker among them) are this project's defaults, never the run's.
    local = {k: v for k, v in base_config().items() if k in LOCAL_KEYS}
    cfg = {**complete(run.config()), **local, "models_dir": str(run.path.parent), "name": f"{base}-{chain}-st{round_}",
           "init_from": str(run.path),
           "pseudo": str(pseudo), "epochs": epochs, "lr": lr, "warmup_epochs": 0.0, "mixup": 0.0, "cutmix": 0.0,
           "jsd": 0.0, "stop_after": None, "unfreeze": None}
    return RunDir(train.train(cfg, force=force))


def one_round(spec_path: Path, round_: int, args, say=print) -> Path:
    """Pseudo-label, fine-tune every member run, predict and ensemble again; returns the new JSON."""
    t0 = time.time()
    members, spec, images, probs, rep = pseudo_set(spec_path, args.threshold, args.per_class, args.max_images,
                                                    args.models_dir)
    cap = rep["max_images"]
    chain = re.sub(r"-st\d+$", "", spec["name"])
    name = f"{chain}-st{round_}"
    folder = Path(args.out_dir) / "selftrain" / name
    pseudo = folder / "pseudo.npz"
    with_tmp = folder / ".pseudo.tmp.npz"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(with_tmp, images=images, probs=probs)
    with_tmp.replace(pseudo)
    save_json(pseudo.with_suffix(".json"), rep)
    lr = f"lr {args.lr}" if args.lr is not None else f"lr {LR_FRACTION} x each member's own"
    say(f"round {round_}: {rep['images']} of {rep['of']} OOD images pseudo-labelled (confidence >= {args.threshold}, "
        f"at most {cap or 'all'}, mean {rep['mean_confidence']:.3f}; per class {rep['per_class']}); fine-tuning "
        f"{args.epochs} epochs at {lr}")
    suite = data.OodSet(args.suite) if args.suite else None
    if suite is not None and score.images_overlap(suite.info(), rep["pool"]):
        raise CompetitionError(f"{suite.path} holds images that are pseudo-labelled here ({rep['ood_dir']}: "
                               f"{'the competition files are CIFAR-100 test images' if not rep['pool'] else 'the same rows'}"
                               f"): scoring on it would measure what the models trained on; build the measuring suite "
                               f"from other images (a measure reserve: folds --measure-n)")
    new_runs = []
    for m in members:
        for run in m.runs:
            new = fine_tune(run, pseudo, chain, round_, args.epochs, args.lr, args.force)
            record = next(iter(run.manifest(m.setting).values()), None) or \
                next(iter(run.manifest(base_setting(m.setting)).values()), {})
            dirs = [spec["ood_dir"]] + ([args.suite] if args.suite else [])
            predict.predict_run(new, dirs, member_predict_spec(m.setting, record), allow_partial=True)
            new_runs.append(new)
    chosen = spec.get("adaptation", "none")
    how = EnsembleSpec(method=spec["method"], rounds=spec.get("rounds") or 40, tta=record.get("tta"),
                       adapt="auto" if isinstance(chosen, dict) else chosen, fit_on=spec.get("fit_on", "auto"),
                       **recorded_post(spec))
    csv = ensemble.build(new_runs, name, spec["ood_dir"], args.out_dir, how, overwrite=args.force, say=say,
                         allow_partial=True)
    out = csv.with_suffix(".json")
    info = read_json(out)
    info["selftrain"] = {"round": round_, "from": str(spec_path), "pseudo": str(pseudo), **rep,
                         "seconds": round(time.time() - t0, 1)}
    save_json(out, info)
    if args.suite:
        score.score_target(out, args.suite, say=say)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m competition.selftrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("submission", help="submissions/<name>.json (competition.ensemble's sidecar)")
    p.add_argument("--rounds", type=count, default=1, help="self-training rounds (1-2 pay; each starts from the last)")
    p.add_argument("--threshold", type=float, default=0.8, help="keep OOD rows whose top probability is at least this")
    p.add_argument("--per-class", type=count, default=None, help="at most this many pseudo-labels per class "
                                                               "(default: 1.5x the median class count)")
    p.add_argument("--max-images", type=int, default=None, help="at most this many pseudo-labelled images, a seeded "
                   f"sample (default: {PSEUDO_FRACTION}x the labelled images the members trained on; 0: no cap)")
    p.add_argument("--epochs", type=count, default=3, help="fine-tuning epochs per round")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning peak learning rate, cosine to 0 (default: "
                   f"{LR_FRACTION}x each member's own training lr)")
    p.add_argument("--suite", help="a labelled local suite to score each round on (its images must not be pseudo-"
                                   "labelled ones)")
    p.add_argument("--out-dir", default="submissions", help="where each round's <name>-st<r>.csv/.json and its "
                                                                "selftrain/ folder (the pseudo-labels) go")
    p.add_argument("--models-dir", default=base_config()["models_dir"], help="the folder the member runs lie in (the "
                   "fine-tuned runs are written beside them); a JSON naming a run outside it is refused")
    p.add_argument("--force", action="store_true", help="retrain rounds that exist")
    args = p.parse_args(argv)
    if not 0 < args.threshold < 1 or args.rounds < 1:
        raise CompetitionError("--threshold must lie in (0, 1) and --rounds be at least 1")
    if (args.max_images is not None and args.max_images < 0) or (args.lr is not None and not 0 < args.lr < float("inf")):
        raise CompetitionError("--max-images must be >= 0 (0: no cap) and --lr a finite number > 0")
    spec = Path(args.submission)
    done = previous_round(spec)  # continuing a self-trained submission
    for r in range(done + 1, done + args.rounds + 1):
        spec = one_round(spec, r, args)
    print(spec.with_suffix(".csv"))
    return spec


if __name__ == "__main__":
    cli(main)()
