"""Stage 5: estimate the leaderboard offline on a local, labelled corruption suite.

    # 1. the suite: held-out labelled images, corrupted 19 ways x 5 severities, written exactly
    #    like the competition's OOD files (plus labels.npy and suite.json)
    python -m competition.score suite --out data/ood-local/digits-n40 --dataset digits --n 40
    python -m competition.score suite --out data/ood-local/cifar100 --dataset cifar100 --n 2000
    python -m competition.score suite --out /tmp/ood --images held_out.npy --names fog,snow --preview p.png
    # 2. predict on it like on the real files
    python -m competition.predict 'models/part*-demo-f0-s0' --ood-dir data/ood-local/digits-n40
    # 3. score runs and/or submissions (a submission is scored through its JSON: runs x weights)
    python -m competition.score models/part1-demo-f0-s0 submissions/demo.json --ood-dir data/ood-local/digits-n40
    python -m competition.score models/part3-f0-s0 --ood-dir data/ood-local/cifar100 --bn-adapt

The suite's images are the dataset's test split when it has one (digits, cifar100, an image
folder with test/); otherwise the held-out images of fold 0, and then runs trained on another
fold (which saw those images) are flagged as leaking. Each report gives clean accuracy (the
test split; else out-of-fold), OOD accuracy per corruption and severity, their mean (every
cell holds the same images, so it is the accuracy over the whole suite: the leaderboard
estimate) and the expected calibration error (15 equal-width confidence bins). It is written
as markdown and a corruption x severity heat map: models/<run>/score_<logits>.md/.png, or
submissions/<name>.score.md/.png (and the submission's JSON gets a local_score entry).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from competition import data, folds, plots
from competition.files import CompetitionError, cli, save_json, save_text
from competition.metrics import Calibration, accuracy, ece, file_accuracy, table_summary
from competition.runs import Member, RunDir, expand_runs, members_from_json, ood_logits, oof_labels, test_logits

SEV = data.SEVERITIES

# ---------------------------------------------------------------------------- the suite


def held_out_images(dataset: str, path=None, data_dir="data", folds_dir="folds"):
    """(images, labels, source) to corrupt: the test split, else fold 0's held-out images."""
    test = data.load(dataset, "test", data_dir, path)
    if test is not None:
        return test.images, test.labels, {"dataset": dataset, "data": path and str(path), "split": "test"}
    train = data.load(dataset, "train", data_dir, path)
    fpath = folds.folds_path(folds.dataset_name(dataset, path), folds_dir)
    frame = folds.read_folds(fpath)
    if len(frame) != len(train.labels):
        raise CompetitionError(f"{fpath} was made for another dataset ({len(frame)} rows, {len(train.labels)} images)")
    rows = np.flatnonzero(frame["fold"].to_numpy() == 0)
    print(f"warning: {path} has no test/ split: the suite uses fold 0's {len(rows)} held-out images. Runs trained "
          f"with another --fold saw them in training, so their local scores LEAK (too high); score fold-0 runs",
          file=sys.stderr)
    return train.images[rows], train.labels[rows], {"dataset": dataset, "data": path and str(path),
                                                    "split": "train", "fold": 0, "rows_of": str(fpath)}


def images_from_file(path) -> tuple[np.ndarray, None, dict]:
    """(images, no labels, source) from a uint8 (N, H, W, 3) .npy."""
    try:
        images = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CompetitionError(f"{path} is not a readable .npy file ({type(e).__name__}: {e})") from None
    data.check_images(images, str(path))
    return images, None, {"images": str(path)}


def build_suite(out, dataset: str = "digits", path=None, data_dir="data", folds_dir="folds", n: int = 200,
                seed: int = 0, names=None, workers: int | None = None, images_npy=None, preview=None,
                preview_images: int = 2) -> Path:
    """Write the local suite to `out` (skipped when it is already there); returns `out`. Labelled
    when the images come from a dataset; `images_npy` corrupts a .npy of images instead.
    `preview`: also draw a PNG of the first `preview_images` images under every corruption."""
    from competition import corruptions

    images, labels, source = images_from_file(images_npy) if images_npy else held_out_images(dataset, path, data_dir,
                                                                                             folds_dir)
    rows = data.sample_rows(len(images), n, seed)
    names = list(names or corruptions.CORRUPTIONS)
    t0 = time.time()
    corruptions.make_suite(images[rows], out, seed=seed, names=names,
                           labels=None if labels is None else labels[rows], workers=workers)
    save_json(Path(out) / "suite.json", {**source, "n": int(len(rows)), "seed": seed, "rows": rows.tolist()})
    print(f"suite {out}: {len(names)} corruptions x {SEV} severities x {len(rows)} images "
          f"({source.get('split', 'file')}) in {time.time() - t0:.1f} s")
    if preview:
        print(f"preview: {corruptions.preview(images[rows[:preview_images]], preview, seed=seed, names=names)}")
    return Path(out)


# ---------------------------------------------------------------------------- scoring a target


def _leaks(cfgs: list[dict], info: dict, runs: list[RunDir]) -> list[str]:
    """Runs trained on the suite's images (a suite from fold 0 of the training split)."""
    if info.get("split") != "train":
        return []
    return [str(r) for c, r in zip(cfgs, runs) if c.get("fold") != info.get("fold")]


def submission_target(target: Path, ood: data.OodSet, adapted: bool):
    """(runs, clean (logits, labels) or None, OOF accuracy, stream of OOD logits) of a submission JSON."""
    members, weights, spec = members_from_json(target)
    runs = [r for m in members for r in m.runs]
    oof_acc = (spec.get("oof") or {}).get("accuracy")
    return runs, test_logits(members, weights), oof_acc, ood_logits(members, weights, ood, adapted)


def run_target(run: RunDir, ood: data.OodSet, adapted: bool):
    """The same for one run folder."""
    oof_acc = None
    if (run / RunDir.OOF_TTA).exists():
        idx, logits = run.oof_tta()
        oof_acc = accuracy(logits, oof_labels([Member(run.name, [run])])[idx])
    stream = ((src, np.load(p).astype(np.float32)) for src, p in zip(ood.files, run.ood_logits_paths(ood, adapted)))
    return [run], run.test_logits(), oof_acc, stream


def score_target(target, ood_dir, bn_adapt: bool = False, bins: int = 15, out=None, say=print) -> dict:
    """Score a run folder or a submission JSON on a labelled suite; writes the markdown report and
    heat map and returns the numbers."""
    target, path = Path(target), Path(getattr(ood_dir, "path", ood_dir))
    if not (path / "labels.npy").exists():
        raise CompetitionError(f"{path}/labels.npy is missing: score needs a labelled local suite "
                               f"(python -m competition.score suite --out {path} ...), not the competition's files")
    ood = ood_dir if isinstance(ood_dir, data.OodSet) else data.OodSet(path)
    labels = ood.labels
    info, sub = ood.info(), RunDir.ood_subdir(ood, bn_adapt)
    is_json = target.suffix == ".json"
    runs, test, oof_acc, stream = (submission_target(target, ood, bn_adapt) if is_json
                                   else run_target(RunDir(target), ood, bn_adapt))
    prefix = Path(out) if out else (target.parent / f"{target.stem}.score" if is_json else target / f"score_{sub}")
    cal, names, table = Calibration(bins), [], []
    for src, z in stream:
        table.append(file_accuracy(z, labels))
        cal.add(z, np.tile(labels, SEV))
        names.append(info["names"].get(src.name, src.stem))
    table = np.stack(table)
    result = {"target": str(target), "ood_dir": str(ood.path), "logits": sub, "images_per_severity": int(len(labels)),
              "clean_accuracy": accuracy(*test) if test is not None else None,
              "clean_ece": ece(*test, bins=bins) if test is not None else None,
              "oof_accuracy": oof_acc, **table_summary(table), "ood_ece": cal.ece(),
              "corruptions": names, "table": table.round(6).tolist(),
              "leaking_runs": _leaks([r.config() for r in runs], info, runs)}
    save_text(Path(f"{prefix}.md"), markdown(result, info))
    plots.heatmap(table, names, Path(f"{prefix}.png"), f"{target.name}: OOD accuracy ({sub})")
    if is_json:
        spec = members_from_json(target)[2]
        spec["local_score" + ("_bnadapt" if bn_adapt else "")] = {k: v for k, v in result.items() if k != "table"}
        save_json(target, spec)
    say_result(result, info, prefix, say)
    return result


def say_result(result: dict, info: dict, prefix: Path, say=print) -> None:
    oof_acc = result["oof_accuracy"]
    clean = f"{result['clean_accuracy']:.4f}" if result["clean_accuracy"] is not None else (
        f"n/a (OOF {oof_acc:.4f})" if oof_acc is not None else "n/a")
    say(f"score {result['target']}: clean acc {clean} | OOD acc {result['ood_accuracy']:.4f} (leaderboard estimate, "
        f"{result['logits']}) | ECE clean {_fmt(result['clean_ece'])} OOD {result['ood_ece']:.4f} | report "
        f"{Path(f'{prefix}.md')}")
    if result["leaking_runs"]:
        say(f"warning: {', '.join(result['leaking_runs'])} trained on the suite's images (fold "
            f"{info.get('fold')} held-out rows): this score is optimistic")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def markdown(r: dict, info: dict) -> str:
    src = (f"{info.get('dataset', '?')} {info.get('split', '?')} split" + (f", fold {info['fold']} held-out"
                                                                           if info.get("fold") is not None else ""))
    lines = [f"# Local score: {r['target']}", "",
             f"Suite `{r['ood_dir']}` ({src}; {r['images_per_severity']} images per corruption and severity), "
             f"logits `{r['logits']}`.", "",
             "| clean acc | OOF acc | OOD acc (leaderboard estimate) | ECE clean | ECE OOD |",
             "|---:|---:|---:|---:|---:|",
             f"| {_fmt(r['clean_accuracy'])} | {_fmt(r['oof_accuracy'])} | **{r['ood_accuracy']:.4f}** | "
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

    p = argparse.ArgumentParser(prog="python -m competition.score", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{suite,run}", required=True)
    s = sub.add_parser("suite", help="build a labelled local OOD suite", description="Build the local OOD suite: "
                       "held-out images corrupted in the competition's file format.")
    s.add_argument("--out", required=True, help="folder for distortionNN.npy, labels.npy, suite.json")
    s.add_argument("--dataset", default="digits", choices=data.SOURCES)
    s.add_argument("--data", help="imagefolder: folder or .tar.gz")
    s.add_argument("--images", help="a uint8 (N, H, W, 3) .npy to corrupt instead of a dataset (no labels)")
    s.add_argument("--data-dir", default="data")
    s.add_argument("--folds-dir", default="folds", help="for a dataset without test split: fold 0 is used")
    s.add_argument("--n", type=int, default=200, help="held-out images per corruption and severity (0: all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--names", default=",".join(CORRUPTIONS), help="comma-separated corruptions, in file order")
    s.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU for >= 500 images)")
    s.add_argument("--preview", help="also draw a PNG grid (rows = corruptions, columns = clean + severities)")
    s.add_argument("--preview-images", type=int, default=2, help="images shown side by side in the preview")
    r = sub.add_parser("run", help="score runs and submissions (the default: `score TARGET...`)",
                       description="Score run folders and submission JSONs on a labelled suite.")
    r.add_argument("targets", nargs="+", help="run folders (or quoted globs) and/or submissions/<name>.json")
    r.add_argument("--ood-dir", required=True, help="the labelled local suite (score suite --out DIR)")
    r.add_argument("--bn-adapt", action="store_true", help="score the BN-adapted logits (predict --bn-adapt)")
    r.add_argument("--bins", type=int, default=15, help="confidence bins of the calibration error")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("suite", "run", "-h", "--help"):
        argv = ["run", *argv]  # `score TARGET... --ood-dir D` is short for `score run TARGET...`
    a = _parser().parse_args(argv)
    if a.command == "suite":
        names = [x.strip() for x in a.names.split(",") if x.strip()]
        return build_suite(a.out, a.dataset, a.data, a.data_dir, a.folds_dir, a.n, a.seed, names, a.workers,
                           a.images, a.preview, a.preview_images)
    results = []
    for t in a.targets:
        targets = [Path(t)] if t.endswith(".json") else [r.path for r in expand_runs([t])]
        results += [score_target(x, a.ood_dir, a.bn_adapt, a.bins) for x in targets]
    return results


if __name__ == "__main__":
    cli(main)()
