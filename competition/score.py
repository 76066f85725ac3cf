"""Stage 5: estimate the leaderboard offline on a local, labelled corruption suite.

    # 1. the suite: held-out labelled images, corrupted 19 ways x 5 severities, written exactly
    #    like the competition's OOD files (plus labels.npy and suite.json)
    python -m competition.score suite --out data/ood-local/digits --dataset digits --n 40
    python -m competition.score suite --out data/ood-local/cifar100 --dataset cifar100 --n 2000
    # 2. predict on it like on the real files
    python -m competition.predict 'models/part*-demo-f0-s0' --ood-dir data/ood-local/digits
    # 3. score runs and/or submissions (a submission is scored through its JSON: runs x weights)
    python -m competition.score models/part1-demo-f0-s0 submissions/demo.json --ood-dir data/ood-local/digits
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
import json
import sys
import time
from pathlib import Path

import numpy as np

from competition import data, folds, predict
from competition.files import CompetitionError, atomic_path, cli, save_json, save_text

SEV = data.SEVERITIES

# ---------------------------------------------------------------------------- metrics


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class Calibration:
    """Expected calibration error accumulated batch by batch (Guo et al. 2017): per equal-width
    confidence bin, |accuracy - mean confidence|, weighted by the bin's share of samples."""

    def __init__(self, bins: int = 15):
        self.bins = bins
        self.count = np.zeros(bins)
        self.conf = np.zeros(bins)
        self.correct = np.zeros(bins)

    def add(self, logits: np.ndarray, labels: np.ndarray) -> "Calibration":
        p = softmax(logits)
        conf, pred = p.max(1), p.argmax(1)
        b = np.minimum((conf * self.bins).astype(int), self.bins - 1)
        np.add.at(self.count, b, 1)
        np.add.at(self.conf, b, conf)
        np.add.at(self.correct, b, pred == labels)
        return self

    def ece(self) -> float:
        n = self.count.sum()
        if not n:
            return float("nan")
        return float(np.abs(self.correct - self.conf).sum() / n)


def ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    return Calibration(bins).add(logits, labels).ece()


def file_accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy per severity (5,) of one OOD file's logits (5*N rows, severity-major) against the
    suite's N labels (the same images at every severity)."""
    n = len(labels)
    if len(logits) != SEV * n:
        raise CompetitionError(f"{len(logits)} logit rows for a suite of {n} labels x {SEV} severities")
    return (np.asarray(logits).argmax(1).reshape(SEV, n) == labels[None]).mean(1)


def summary(table: np.ndarray) -> dict:
    """Numbers of an accuracy table (files x severities)."""
    table = np.asarray(table, float)
    return {"ood_accuracy": float(table.mean()), "per_severity": table.mean(0).round(6).tolist(),
            "per_file": table.mean(1).round(6).tolist()}


# ---------------------------------------------------------------------------- the suite


def suite_labels(ood_dir) -> np.ndarray | None:
    path = Path(ood_dir) / "labels.npy"
    return np.load(path) if path.exists() else None


def suite_info(ood_dir) -> dict:
    """suite.json (where the images came from) plus the corruption names of corruptions.json."""
    def read(name):
        try:
            return json.loads((Path(ood_dir) / name).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    return {**read("suite.json"), "names": read("corruptions.json").get("names", {})}


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


def build_suite(out, dataset: str = "digits", path=None, data_dir="data", folds_dir="folds", n: int = 200,
                seed: int = 0, names=None, workers: int | None = None) -> Path:
    """Write the labelled local suite to `out` (skipped when it is already there); returns `out`."""
    from competition import corruptions

    images, labels, source = held_out_images(dataset, path, data_dir, folds_dir)
    rows = np.arange(len(images))
    if 0 < n < len(images):  # a stratified-enough seeded sample; the same n and seed give the same images
        rows = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    names = list(names or corruptions.CORRUPTIONS)
    t0 = time.time()
    corruptions.make_suite(images[rows], out, seed=seed, names=names, labels=labels[rows], workers=workers)
    save_json(Path(out) / "suite.json", {**source, "n": int(len(rows)), "seed": seed, "rows": rows.tolist()})
    print(f"suite {out}: {len(names)} corruptions x {SEV} severities x {len(rows)} {source['split']} images of "
          f"{dataset} ({time.time() - t0:.1f} s)")
    return Path(out)


# ---------------------------------------------------------------------------- scoring a target


def _leaks(cfgs: list[dict], info: dict) -> list[str]:
    if info.get("split") != "train":
        return []
    return [c.get("run_dir", "?") for c in cfgs if c.get("fold") != info.get("fold")]


def score_target(target, ood_dir, bn_adapt: bool = False, bins: int = 15, out=None, say=print) -> dict:
    """Score a run folder or a submission JSON on a labelled suite; writes the markdown report and
    heat map and returns the numbers."""
    from competition import ensemble

    target, ood_dir = Path(target), Path(ood_dir)
    labels = suite_labels(ood_dir)
    if labels is None:
        raise CompetitionError(f"{ood_dir}/labels.npy is missing: score needs a labelled local suite "
                               f"(python -m competition.score suite --out {ood_dir} ...), not the competition's files")
    info = suite_info(ood_dir)
    sub = predict.ood_subdir(ood_dir, bn_adapt)
    if target.suffix == ".json":
        members, weights, spec = ensemble.members_from_json(target)
        cfgs = [c for m in members for c in m.cfgs]
        test = ensemble.test_logits(members, weights)
        oof_acc = (spec.get("oof") or {}).get("accuracy")
        stream = ensemble.ood_logits(members, weights, ood_dir, bn_adapt)
        prefix = Path(out) if out else target.parent / f"{target.stem}.score"
    else:
        cfgs = [ensemble.run_config(target)]
        test = None
        if (target / "test_logits.npy").exists():
            test = np.load(target / "test_logits.npy"), np.load(target / "test_labels.npy")
        oof_acc = None
        if (target / "oof_tta_logits.npy").exists():
            idx = np.load(target / "oof_index.npy")
            lab = ensemble.oof_labels([ensemble.Member(target.name, [target], cfgs)])
            oof_acc = ensemble.accuracy(np.load(target / "oof_tta_logits.npy"), lab[idx])
        stream = ((src, np.load(p).astype(np.float32)) for src, p in
                  zip(data.ood_files(ood_dir, expected=None), predict.ood_logits_paths(target, ood_dir, bn_adapt)))
        prefix = Path(out) if out else target / f"score_{sub}"

    cal = Calibration(bins)
    names, table = [], []
    for src, z in stream:
        table.append(file_accuracy(z, labels))
        cal.add(z, np.tile(labels, SEV))
        names.append(info["names"].get(src.name, src.stem))
    table = np.stack(table)
    result = {"target": str(target), "ood_dir": str(ood_dir), "logits": sub, "images_per_severity": int(len(labels)),
              "clean_accuracy": ensemble.accuracy(*test) if test is not None else None,
              "clean_ece": ece(*test, bins=bins) if test is not None else None,
              "oof_accuracy": oof_acc, **summary(table), "ood_ece": cal.ece(),
              "corruptions": names, "table": table.round(6).tolist(), "leaking_runs": _leaks(cfgs, info)}
    save_text(Path(f"{prefix}.md"), markdown(result, info))
    heatmap(table, names, Path(f"{prefix}.png"), f"{target.name}: OOD accuracy ({sub})")
    if target.suffix == ".json":
        spec["local_score" + ("_bnadapt" if bn_adapt else "")] = {k: v for k, v in result.items() if k != "table"}
        save_json(target, spec)
    clean = f"{result['clean_accuracy']:.4f}" if result["clean_accuracy"] is not None else (
        f"n/a (OOF {oof_acc:.4f})" if oof_acc is not None else "n/a")
    say(f"score {target}: clean acc {clean} | OOD acc {result['ood_accuracy']:.4f} (leaderboard estimate, {sub}) | "
        f"ECE clean {_fmt(result['clean_ece'])} OOD {result['ood_ece']:.4f} | report {Path(f'{prefix}.md')}")
    if result["leaking_runs"]:
        say(f"warning: {', '.join(result['leaking_runs'])} trained on the suite's images (fold "
            f"{info.get('fold')} held-out rows): this score is optimistic")
    return result


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


def heatmap(table: np.ndarray, names: list[str], path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 0.32 * len(names) + 1.4))
    im = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(SEV), [f"s{s}" for s in range(1, SEV + 1)])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for (i, j), a in np.ndenumerate(table):
        ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=7, color="white" if a < 0.6 else "black")
    ax.set_title(f"{title}\nmean {table.mean():.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- entry point


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["suite"]:
        from competition.corruptions import CORRUPTIONS

        p = argparse.ArgumentParser(prog="python -m competition.score suite",
                                    description="build the labelled local OOD suite")
        p.add_argument("--out", required=True, help="folder for distortionNN.npy, labels.npy, suite.json")
        p.add_argument("--dataset", default="digits", choices=data.SOURCES)
        p.add_argument("--data", help="imagefolder: folder or .tar.gz")
        p.add_argument("--data-dir", default="data")
        p.add_argument("--folds-dir", default="folds", help="for a dataset without test split: fold 0 is used")
        p.add_argument("--n", type=int, default=200, help="held-out images per corruption and severity (0: all)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--names", default=",".join(CORRUPTIONS), help="comma-separated corruptions, in file order")
        p.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU for >= 500 images)")
        a = p.parse_args(argv[1:])
        return build_suite(a.out, a.dataset, a.data, a.data_dir, a.folds_dir, a.n, a.seed,
                           [x.strip() for x in a.names.split(",") if x.strip()], a.workers)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", help="run folders (or quoted globs) and/or submissions/<name>.json")
    p.add_argument("--ood-dir", required=True, help="the labelled local suite (score suite --out DIR)")
    p.add_argument("--bn-adapt", action="store_true", help="score the BN-adapted logits (predict --bn-adapt)")
    p.add_argument("--bins", type=int, default=15, help="confidence bins of the calibration error")
    a = p.parse_args(argv)
    results = []
    for t in a.targets:
        targets = [Path(t)] if t.endswith(".json") else predict.expand_runs([t])
        results += [score_target(x, a.ood_dir, a.bn_adapt, a.bins) for x in targets]
    return results


if __name__ == "__main__":
    cli(main)()
