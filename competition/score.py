"""Stage 5: estimate the leaderboard offline on a local, labelled corruption suite.

    # 1. the suite: held-out labelled images, corrupted 19 ways x 5 severities, written exactly
    #    like the competition's OOD files (plus labels.npy and suite.json)
    python -m competition.score suite --out data/ood-local/digits-n40 --dataset digits --n 40
    python -m competition.folds --dataset cifar100 --measure-n 5000     # the measure reserve, once
    python -m competition.score suite --out data/ood-local/cifar100 --dataset cifar100 --n 2000
    python -m competition.score suite --out /tmp/ood --images held_out.npy --names fog,snow --preview p.png
    # 2. predict on it like on the real files
    python -m competition.predict 'models/part*-demo-f0-s0' --ood-dir data/ood-local/digits-n40
    # 3. score runs and/or submissions (a submission is scored through its JSON: runs x weights)
    python -m competition.score models/part1-demo-f0-s0 submissions/demo.json --ood-dir data/ood-local/digits-n40
    python -m competition.score models/part3-f0-s0 --ood-dir data/ood-local/cifar100 --bn-adapt

Three roles for labelled images, and the suite's: members *train* on their training folds; every
choice (best epoch, ensemble weights, adaptation) is made on the *choose* images, corrupted copies
of the held-out folds; the suite is the *measure*: built from the folds file's measure reserve
(`python -m competition.folds --measure-n N`: rows no run trains on and no choice sees) when it
has one, else from the dataset's test split, except CIFAR-100's (the competition's OOD files are
that split corrupted: refused unless --leaderboard-labels, and every report then says so).
`--fold K` builds it from a held-out fold instead: choose images, and every report says that
too. Each report names its images' role and flags runs that may have seen them (trained on
them, trained beside another reserve, or self-trained on pseudo-labelled copies of them).

Each report gives clean accuracy (the test split; else out-of-fold), OOD accuracy per
corruption and severity, their mean (every cell holds the same images, so it is the accuracy
over the whole suite: the leaderboard estimate) and the expected calibration error (15
equal-width confidence bins). It is written as markdown and a corruption x severity heat map:
models/<run>/pred/<setting>/ood/<suite>/score.md/.png, or submissions/<name>.score.md/.png (and
the submission's JSON gets a local_score entry).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from competition import data, folds, plots, tta
from competition.corruptions import trained_on
from competition.files import CompetitionError, cli, count, count0, read_json, save_json, save_text
from competition.metrics import Calibration, accuracy, ece, file_right, image_standard_error, member_weights, \
    table_summary
from competition.runs import Member, RunDir, adaptation, base_setting, default_setting, expand_runs, file_hash, \
    members_from_json, ood_logits, honest_post, oof_labels, parse_adaptation, setting_name, test_logits

SEV = data.SEVERITIES

# ---------------------------------------------------------------------------- the suite


def held_out_images(dataset: str, path=None, data_dir="data", folds_dir="folds", fold: int | None = None,
                    leaderboard_labels: bool = False):
    """(images, labels, source) to corrupt, by role: the folds file's measure reserve when it has
    one; else the dataset's test split (CIFAR-100's only with leaderboard_labels: its labels are
    the leaderboard's); `fold`: that held-out fold's images (choose images, flagged as such)."""
    if fold is not None and fold < 0:
        raise CompetitionError(f"--fold {fold}: a held-out fold is 0..k-1 (the measure reserve is the default "
                               f"without --fold)")
    fpath = folds.folds_path(folds.dataset_name(dataset, path), folds_dir)
    frame = folds.read_folds(fpath) if fpath.exists() else None
    reserve = folds.measure_rows(frame) if frame is not None and fold is None else np.arange(0)
    source = {"dataset": dataset, "data": path and str(path)}
    if fold is None and not len(reserve):
        if (dataset, "test") == data.LEADERBOARD_SPLIT and not leaderboard_labels:
            raise CompetitionError(
                "a local suite from CIFAR-100's test split would be scored on the leaderboard's own answers (the "
                "competition's OOD files are that split, corrupted). Reserve training images to measure on: "
                "python -m competition.folds --dataset cifar100 --measure-n 5000 --force (then retrain), or pass "
                "--leaderboard-labels to build it anyway (every report then says so)")
        test = data.load(dataset, "test", data_dir, path)
        if test is not None:
            return test.images, test.labels, {**source, "split": "test",
                                              **({"leaderboard_labels": True} if leaderboard_labels else {})}
    train = data.load(dataset, "train", data_dir, path)
    if frame is None:
        frame = folds.read_folds(fpath)  # the clear "run competition.folds first" error
    if len(frame) != len(train.labels):
        raise CompetitionError(f"{fpath} was made for another dataset ({len(frame)} rows, {len(train.labels)} images)")
    if len(reserve):
        print(f"the suite uses the measure reserve of {fpath}: {len(reserve)} training images no run trains on",
              file=sys.stderr)
        return train.images[reserve], train.labels[reserve], {**source, "split": "measure", "rows_of": str(fpath),
                                                              "reserve": folds.reserve_id(reserve),
                                                              "fold_rows": reserve.tolist()}
    fold = fold or 0
    rows = np.flatnonzero(frame["fold"].to_numpy() == fold)
    print(f"note: the suite uses fold {fold}'s {len(rows)} held-out images: choose images, not a measure (runs "
          f"holding it out selected on corrupted copies of it; runs trained on it LEAK). For an honest estimate "
          f"make a measure reserve: python -m competition.folds --measure-n N --force", file=sys.stderr)
    return train.images[rows], train.labels[rows], {**source, "split": "train", "fold": fold, "rows_of": str(fpath),
                                                    "fold_rows": rows.tolist()}


def images_from_file(path) -> tuple[np.ndarray, None, dict]:
    """(images, no labels, source) from a uint8 (N, H, W, 3) .npy."""
    data.check_npy(path)
    try:
        images = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CompetitionError(f"{path} is not a readable .npy file ({type(e).__name__}: {e})") from None
    data.check_images(images, str(path))
    return images, None, {"images": str(path)}


def suite_rows(source: dict, count: int, n: int, seed: int, balanced_labels=None) -> np.ndarray:
    """The seeded `n` of `count` images a suite corrupts (each class equally when given the images'
    `balanced_labels`); records in `source` which rows of the folds CSV they are (source_rows, for
    leak checks) when they come from a fold."""
    if balanced_labels is not None:
        source["balanced"] = True
    rows = data.sample_rows(count, n, seed) if balanced_labels is None else \
        data.sample_balanced(balanced_labels, n or len(balanced_labels), seed)
    if "fold_rows" in source:
        source["source_rows"] = np.asarray(source.pop("fold_rows"))[rows].tolist()
    return rows


def build_suite(out, dataset: str = "digits", path=None, data_dir="data", folds_dir="folds", n: int = 200,
                seed: int = 0, names=None, workers: int | None = None, images_npy=None, preview=None,
                preview_images: int = 2, fold: int | None = None, leaderboard_labels: bool = False,
                balanced: bool = False) -> Path:
    """Write the local suite to `out` (skipped when it is already there); returns `out`. Labelled
    when the images come from a dataset; `images_npy` corrupts a .npy of images instead.
    `balanced`: every class equally, as in the competition's files (needed to measure --balance).
    `preview`: also draw a PNG of the first `preview_images` images under every corruption."""
    from competition import corruptions

    images, labels, source = images_from_file(images_npy) if images_npy else \
        held_out_images(dataset, path, data_dir, folds_dir, fold, leaderboard_labels)
    if balanced and labels is None:
        raise CompetitionError("--balanced needs labelled images (a dataset), not --images")
    rows = suite_rows(source, len(images), n, seed, labels if balanced else None)
    names = list(names or corruptions.CORRUPTIONS)
    t0 = time.time()
    corruptions.make_suite(images[rows], out, seed=seed, names=names,
                           labels=None if labels is None else labels[rows], workers=workers)
    save_json(Path(out) / "suite.json", {**source, "n": int(len(rows)), "seed": seed, "rows": rows.tolist()})
    print(f"suite {out}: {len(names)} corruptions x {SEV} severities x {len(rows)} images in "
          f"{time.time() - t0:.1f} s; role: {data.OodSet(out).role() if labels is not None else 'unlabelled'}")
    if preview:
        print(f"preview: {corruptions.preview(images[rows[:preview_images]], preview, seed=seed, names=names)}")
    return Path(out)


# ---------------------------------------------------------------------------- scoring a target


def images_overlap(suite: dict, pool: dict) -> bool:
    """Whether two OOD folders' suite.json say they hold copies of the same labelled images: the
    same rows of the training split (fold or measure reserve), or the same test split. The
    competition's files (no suite.json) are CIFAR-100's test split, corrupted."""
    def origin(info):
        if not info.get("split"):
            return data.LEADERBOARD_SPLIT  # the competition's OOD files
        return info.get("dataset"), "train" if info["split"] in ("train", "measure") else info["split"]

    if origin(suite) != origin(pool):
        return False
    if origin(suite)[1] == "train":
        return bool(set(suite.get("source_rows") or []) & set(pool.get("source_rows") or []))
    return True  # two samples of one test split: conservatively the same images


def _leaks(cfgs: list[dict], info: dict, runs: list[RunDir]) -> list[str]:
    """Runs that may have seen the suite's images: trained on its fold of the training split,
    trained beside another measure reserve than the suite's (or none), or fine-tuned on
    pseudo-labelled copies of them (competition.selftrain; the competition's files are copies
    of CIFAR-100's test split)."""
    out = []
    for c, r in zip(cfgs, runs):
        if info.get("split") == "train":
            leak = c.get("fold") != info.get("fold") and info.get("fold") not in (c.get("exclude_folds") or [])
        elif info.get("split") == "measure":  # the run and every run it was fine-tuned from (init_from)
            leak = any(a.data_config().get("measure_reserve") != info.get("reserve") for a in _ancestry(r))
        else:
            leak = False
        if c.get("pseudo"):
            pool = read_json(Path(c["pseudo"]).with_suffix(".json")) or {}
            leak = leak or images_overlap(info, pool.get("pool") or _pool_info(pool))
        if leak:
            out.append(str(r))
    return out


def _ancestry(run: RunDir) -> list[RunDir]:
    """The run and the runs its weights came from (init_from, as self-training and fine-tuning set it)."""
    out, seen = [run], {run.path.resolve()}
    while (src := out[-1].config().get("init_from")) and Path(src).resolve() not in seen and \
            (Path(src) / RunDir.CONFIG).exists():
        seen.add(Path(src).resolve())
        out.append(RunDir(src))
    return out


def _pool_info(rep: dict) -> dict:
    """A pseudo-label report's pool (selftrain records it; older reports: read its folder again)."""
    info = read_json(Path(rep.get("ood_dir", "")) / "suite.json") or {}
    return {**info, "source_rows": rep.get("source_rows") or info.get("source_rows") or []}


def check_pinned(spec: dict, members, ood: data.OodSet, path: Path) -> None:
    """The logits a submission was made from must be the ones scored now (same sha1)."""
    for m in members:
        for run in m.runs:
            pinned = (spec.get("logits_sha1") or {}).get(str(run))
            if pinned is None:
                continue  # scored on another OOD folder than the submission's: nothing pinned there
            for p in run.ood_logits_paths(ood, m.setting):
                rel = str(p.relative_to(run.path))
                if rel in pinned and pinned[rel] != file_hash(p):
                    raise CompetitionError(f"{p} changed since {path} was made (sha1 differs): its score would not "
                                           f"be the submission's; predicting again under the same setting rewrote "
                                           f"it, so rebuild the submission (competition.ensemble) to score it")


def submission_target(target: Path, ood: data.OodSet, say=print):
    """(members, weights, clean (logits, labels) or None, OOF accuracy, post-processing) of a submission JSON."""
    members, weights, spec = members_from_json(target)
    weights = member_weights(weights, target)
    check_pinned(spec, members, ood, target)
    return (members, weights, test_logits(members, weights), (spec.get("oof") or {}).get("accuracy"),
            honest_post(spec, target, ood, say))


def run_target(run: RunDir, setting: str):
    """The same for one run folder under `setting`."""
    member = Member(run.name, [run], setting, cfgs=[run.config()])
    oof_acc = None
    if (run.pred_dir(base_setting(setting)) / RunDir.PRED_OOF).exists():
        idx, logits = run.oof_tta(setting)
        labels = oof_labels([member])
        data.check_rows(run / RunDir.OOF_INDEX, idx, len(labels), f"restore it from the run's copy, or retrain {run}")
        oof_acc = accuracy(logits, labels[idx])
    return [member], np.ones(1), test_logits([member], np.ones(1)), oof_acc, {}


# Result key (never saved) of each suite image's accuracy over all corruptions and severities:
# what a paired comparison of two targets on the same suite differences.
PER_IMAGE = "per_image_accuracy"


def score_target(target, ood_dir, tta_name: str | None = None, adapt: str = "none", bins: int = 15, out=None,
                 say=print, balance: bool = False, copies: bool = False) -> dict:
    """Score a run folder (under the setting of `tta_name` and `adapt`; default TTA: the run's own;
    `balance`: its classes balanced per severity, as ensemble --balance; `copies`: one prediction
    per picture from all its copies, as ensemble --copies) or a submission JSON
    (under the settings it recorded) on a labelled suite; writes the markdown report, heat map
    and JSON, and returns the numbers."""
    target, path = Path(target), Path(getattr(ood_dir, "path", ood_dir))
    if adapt != "none":
        parse_adaptation(adapt)  # a misspelt variant: its own message, not a missing folder's
    if not (path / "labels.npy").exists():
        raise CompetitionError(f"{path}/labels.npy is missing: score needs a labelled local suite "
                               f"(python -m competition.score suite --out {path} ...), not the competition's files")
    ood = ood_dir if isinstance(ood_dir, data.OodSet) else data.OodSet(path)
    is_json = target.suffix == ".json"
    if is_json:
        if balance or copies:
            flag = "--balance" if balance else "--copies"
            raise CompetitionError(f"{flag} is for run folders: {target} is scored as it was made (rebuild it "
                                   f"with competition.ensemble {flag})")
        members, weights, test, oof_acc, post = submission_target(target, ood, say)
        balance, copies = post["balance"], post["copies"]
    else:
        run = RunDir(target)
        setting = setting_name(tta_name, "logits", adapt) if tta_name else \
            (default_setting(run.config()) + (f"+{adapt}" if adapt != "none" else ""))
        members, weights, test, oof_acc, _ = run_target(run, setting)
    runs = [r for m in members for r in m.runs]
    if balance:
        check_balanced(ood, say)
    result = score_table(ood, members, weights, bins, balance, copies)
    result.update(target=str(target), ood_dir=str(ood.path), scored=time.strftime("%Y-%m-%d %H:%M:%S"),
                  settings=sorted({m.setting for m in members}), balance=balance, copies=copies, oof_accuracy=oof_acc,
                  clean_accuracy=accuracy(*test) if test is not None else None,
                  clean_ece=ece(*test, bins=bins) if test is not None else None,
                  leaking_runs=_leaks([r.config() for r in runs], ood.info(), runs), role=ood.role())
    seen = sorted({c for r in runs for c in r.summary().get("trained_on", trained_on(r.config()))})
    unseen = [row for name, row in zip(result["corruptions"], result["table"]) if name not in seen]
    result.update(trained_on=seen, unseen_accuracy=float(np.mean(unseen)) if unseen else None)
    prefix = Path(out) if out else (target.parent / f"{target.stem}.score" if is_json else Path(
        f"{runs[0].score_prefix(members[0].setting, ood)}{'-balanced' if balance else ''}{'-copies' if copies else ''}"))
    if not out and not is_json:
        runs[0].own(Path(f"{prefix}.md"))  # a sent run's pred/ may link outside it
    save_text(Path(f"{prefix}.md"), markdown(result, ood.info()))
    plots.heatmap(np.asarray(result["table"]), result["corruptions"], Path(f"{prefix}.png"),
                  f"{target.name}: OOD accuracy, {tta.setting_words(result['settings'])}", trained_on=seen,
                  role=result["role"], n=result["images_per_severity"])
    save_json(Path(f"{prefix}.json"), {k: v for k, v in result.items() if k != PER_IMAGE})
    if is_json:
        spec = members_from_json(target)[2]
        plain = not balance and not copies and all(adaptation(m.setting) == "none" for m in members)
        key = "local_score" + ("" if plain else "_adapted")
        spec[key] = {k: v for k, v in result.items() if k not in ("table", PER_IMAGE)}
        save_json(target, spec)
    say_result(result, ood.info(), prefix, say)
    return result


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """(accuracy of b - accuracy of a, its standard error) over the suite's images, paired: both
    were scored on the same images, so the noise of which images the suite drew cancels, and a
    difference far smaller than either score's own +- can still be told from zero."""
    x, y = np.asarray(a[PER_IMAGE]), np.asarray(b[PER_IMAGE])
    if a["ood_dir"] != b["ood_dir"] or x.shape != y.shape:
        raise CompetitionError(f"{a['target']} and {b['target']} were scored on different suites: no paired difference")
    d = y - x
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def check_balanced(ood: data.OodSet, say=print) -> None:
    """A note when predictions balanced per severity are scored on a suite whose classes are not
    equal: the competition's files hold each class equally, a suite drawn at random does not,
    and there balancing costs accuracy it would not cost on the leaderboard."""
    counts = np.bincount(ood.labels)
    if counts.min() != counts.max():
        say(f"note: {ood.path} holds its classes unequally ({counts.min()}-{counts.max()} images per class); "
            f"balanced predictions assume equal classes, as in the competition's files: for a figure that "
            f"mirrors them build the suite with `python -m competition.score suite --balanced`")


def score_table(ood: data.OodSet, members, weights, bins: int, balance: bool = False, copies: bool = False) -> dict:
    """Accuracy per corruption and severity, its summary, and the OOD calibration error."""
    labels, info = ood.labels, ood.info()
    cal, names, table, right = Calibration(bins), [], [], []
    for src, z in ood_logits(members, weights, ood, balance, copies):
        if labels.max() >= z.shape[1]:
            raise CompetitionError(f"{ood.path}/labels.npy holds class {labels.max()}, but the models predict "
                                   f"{z.shape[1]} classes: the suite was made from another data set")
        right.append(file_right(z, labels))
        table.append(right[-1].mean(1))
        cal.add(z, np.tile(labels, SEV))
        names.append(info["names"].get(src.name, src.stem))
    table = np.stack(table)
    right = np.concatenate(right)
    return {"images_per_severity": int(len(labels)), **table_summary(table),
            "ood_se": image_standard_error(right), "ood_ece": cal.ece(),
            "corruptions": names, "table": table.round(6).tolist(), PER_IMAGE: right.mean(0)}


def _se(result: dict) -> str:
    """' +- s.e.' to follow an OOD accuracy; '' for scores saved before ood_se was recorded."""
    se = result.get("ood_se")
    return f" +- {se:.4f}" if se is not None and np.isfinite(se) else ""


def say_result(result: dict, info: dict, prefix: Path, say=print) -> None:
    oof_acc = result["oof_accuracy"]
    clean = f"{result['clean_accuracy']:.4f}" if result["clean_accuracy"] is not None else (
        f"n/a (OOF {oof_acc:.4f})" if oof_acc is not None else "n/a")
    n_unseen = sum(c not in result["trained_on"] for c in result["corruptions"])
    unseen = (f" | unseen families {result['unseen_accuracy']:.4f} ({n_unseen} of {len(result['corruptions'])})"
              if result["trained_on"] and result["unseen_accuracy"] is not None else "")
    say(f"score {result['target']}: clean acc {clean} | OOD acc {result['ood_accuracy']:.4f}{_se(result)} "
        f"(leaderboard estimate, {', '.join(result['settings'])}{post_words(result)}){unseen} | ECE clean {_fmt(result['clean_ece'])} OOD "
        f"{result['ood_ece']:.4f} | report {Path(f'{prefix}.md')}")
    say(f"  images: {result['role']}")
    if result["leaking_runs"]:
        say(f"warning: {', '.join(result['leaking_runs'])} may have trained on the suite's images (or on "
            f"pseudo-labelled copies of them): this score is optimistic")


def post_words(result: dict) -> str:
    """' +balance +copies' for the post-processing a score was made with."""
    return "".join(f" +{k}" for k in ("balance", "copies") if result.get(k))


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def markdown(r: dict, info: dict) -> str:
    src = (f"{info.get('dataset', '?')} {info.get('split', '?')} split" + (f", fold {info['fold']} held-out"
                                                                           if info.get("fold") is not None else ""))
    lines = [f"# Local score: {r['target']}", "",
             f"Suite `{r['ood_dir']}` ({src}; {r['images_per_severity']} images per corruption and severity), "
             f"predictions `{', '.join(r['settings'])}`"
             f"{', classes balanced per file and severity' if r.get('balance') else ''}"
             f"{', one prediction per picture from all its copies' if r.get('copies') else ''}. +- is one standard error over the "
             f"{r['images_per_severity']} images (the same ones in every cell).", "",
             f"Role of these images: **{r.get('role', 'not recorded')}**.", "",
             f"Training augmentation saw the families of: {', '.join(r['trained_on']) or 'none of the 19'}; "
             f"mean over the others: **{_fmt(r['unseen_accuracy'])}**.", "",
             "| clean acc | OOF acc | OOD acc (leaderboard estimate) | ECE clean | ECE OOD |",
             "|---:|---:|---:|---:|---:|",
             f"| {_fmt(r['clean_accuracy'])} | {_fmt(r['oof_accuracy'])} | **{r['ood_accuracy']:.4f}**{_se(r)} | "
             f"{_fmt(r['clean_ece'])} | {r['ood_ece']:.4f} |", "",
             "| corruption | " + " | ".join(f"s{s}" for s in range(1, SEV + 1)) + " | mean |",
             "|---|" + "---:|" * (SEV + 1)]
    for name, row in zip(r["corruptions"], r["table"]):
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in row) + f" | {np.mean(row):.3f} |")
    lines.append("| **mean** | " + " | ".join(f"{a:.3f}" for a in r["per_severity"]) + f" | **{r['ood_accuracy']:.3f}** |")
    if r["leaking_runs"]:
        lines += ["", f"**Leak:** {', '.join(r['leaking_runs'])} trained on these images; the score is optimistic."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    from competition.corruptions import CORRUPTIONS

    p = argparse.ArgumentParser(prog="python -m competition.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{suite,run}", required=True)
    s = sub.add_parser("suite", help="build a labelled local OOD suite", description="Build the local OOD suite: "
                       "held-out images corrupted in the competition's file format.")
    s.add_argument("--out", required=True, help="folder for distortionNN.npy, labels.npy, suite.json")
    s.add_argument("--dataset", default="digits", choices=data.SOURCES)
    s.add_argument("--data", help="imagefolder: folder or .tar.gz")
    s.add_argument("--images", help="a uint8 (N, H, W, 3) .npy to corrupt instead of a dataset (no labels)")
    s.add_argument("--data-dir", default="data")
    s.add_argument("--folds-dir", default="folds", help="where the folds file (and its measure reserve) is")
    s.add_argument("--fold", type=int, default=None, help="use this held-out fold of the training split: choose "
                   "images (runs holding it out selected on them), flagged as such; default: the measure reserve "
                   "(folds --measure-n), else the test split")
    s.add_argument("--leaderboard-labels", action="store_true", help="cifar100: build the suite from the test split "
                   "anyway, though its labels are the leaderboard's answers (every report says so)")
    s.add_argument("--n", type=count0, default=200, help="held-out images, the same ones under every corruption and "
                   "severity as in CIFAR-C (0: all); every estimate carries their sampling noise: one s.e. "
                   "at most sqrt(p(1-p)/n), e.g. 1.6 points measured at 78%% accuracy with n=500")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--balanced", action="store_true", help="every class equally (--n a multiple of the classes), "
                   "as in the competition's files: the suite to measure `ensemble --balance` on")
    s.add_argument("--names", default=",".join(CORRUPTIONS), help="comma-separated corruptions, in file order")
    s.add_argument("--workers", type=count, default=None, help="processes (default: one per CPU for >= 500 images)")
    s.add_argument("--preview", help="also draw a PNG grid (rows = corruptions, columns = clean + severities)")
    s.add_argument("--preview-images", type=count, default=2, help="images shown side by side in the preview")
    r = sub.add_parser("run", help="score runs and submissions (the default: `score TARGET...`)",
                       description="Score run folders and submission JSONs on a labelled suite.")
    r.add_argument("targets", nargs="+", help="run folders (or quoted globs) and/or submissions/<name>.json")
    r.add_argument("--ood-dir", required=True, help="the labelled local suite (score suite --out DIR)")
    r.add_argument("--tta", default=None, help="runs: the TTA setting to score (default: each run's own)")
    r.add_argument("--adapt", default="none",
                   help="runs: score the adapted logits (predict --adapt): none, bn, tent, shot, eata, or a setting's "
                        "variant of them as predict names it (tent-all, shot-norm_head-ens0.99, bn0.5)")
    r.add_argument("--bn-adapt", action="store_const", const="bn", dest="adapt", help="the same as --adapt bn")
    r.add_argument("--balance", action="store_true", help="runs: score their predictions balanced per OOD file "
                   "and severity, as ensemble --balance makes them (a submission JSON is scored as it was made)")
    r.add_argument("--copies", action="store_true", help="runs: score one prediction per picture from all its "
                   "copies across the suite's cells, as ensemble --copies makes them")
    r.add_argument("--bins", type=count, default=15, help="confidence bins of the calibration error")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("suite", "run", "-h", "--help"):
        argv = ["run", *argv]  # `score TARGET... --ood-dir D` is short for `score run TARGET...`
    a = _parser().parse_args(argv)
    if a.command == "suite":
        names = [x.strip() for x in a.names.split(",") if x.strip()]
        return build_suite(a.out, a.dataset, a.data, a.data_dir, a.folds_dir, a.n, a.seed, names, a.workers,
                           a.images, a.preview, a.preview_images, a.fold, a.leaderboard_labels, a.balanced)
    results = []
    for t in a.targets:
        targets = [Path(t)] if t.endswith(".json") else [r.path for r in expand_runs([t])]
        results += [score_target(x, a.ood_dir, a.tta, a.adapt, a.bins, balance=a.balance, copies=a.copies) for x in targets]
    for r in results[1:]:  # several targets: each against the first, on the same images
        diff, se = paired_difference(results[0], r)
        print(f"{r['target']} - {results[0]['target']}: OOD acc {100 * diff:+.2f} +- {100 * se:.2f} points "
              f"(paired over the suite's {r['images_per_severity']} images)")
    return results


if __name__ == "__main__":
    cli(main)()
