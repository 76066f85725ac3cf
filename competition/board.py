"""The results board: every run and every submission in one table, best first.

    python -m competition.board                         # models/ and submissions/ of this folder
    python -m competition.board --sort ood              # runs by local OOD estimate (also: clean, time, ...)
    python -m competition.board --out submissions/board # also board.md, board_runs.csv, board_submissions.csv, board.png
    python -m competition.board --fetch --competition SLUG   # first fetch Kaggle's scores of your uploads
    python -m competition.board --stages submissions/x.json --suite data/ood-local/x   # what each stage adds

Runs: part, model, fold, seed, epochs, held-out accuracy (plain, and with the TTA train
validated), the local OOD estimate (plain and BN-adapted, from `competition.score`), the mean
over the corruption families training did not see, training time and the commit that trained
it, and the role of the images each local figure is on (`measure`, or `choose` when a suite was
built from a held-out fold: optimistic). Runs not scored (or not predicted) yet show `-`, and a
broken run folder or sidecar is flagged in its row, instead of stopping the board.
Submissions: members and weights, how the weights were fitted, the local estimate, and the
Kaggle public score once `competition.submit` has uploaded it and `--fetch` read it back.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from competition import plots
from competition.files import CompetitionError, cli, read_json, save_text
from competition.runs import RunDir, adaptation

RUN_SORTS = {"ood": "local OOD", "ood_bn": "local OOD +BN", "clean": "held-out acc", "tta": "held-out acc TTA",
             "time": "train s", "name": "run"}
SUB_SORTS = {"ood": "local OOD", "kaggle": "Kaggle public", "oof": "OOF acc", "name": "submission"}


def _best_score(run: RunDir, adapted: bool) -> dict | None:
    """The newest local score of the run with (or without) test-time adaptation."""
    for s in run.scores():
        if any((adaptation(x) != "none") == adapted for x in s.get("settings", [])):
            return s
    return None


def _role(score: dict) -> str:
    """The first word of the role of a score's images (measure / choose / LEADERBOARD), read from
    the score or, for scores written before roles were recorded, from its suite's folder."""
    from competition import data

    role = score.get("role") or data.suite_role(read_json(Path(score.get("ood_dir", "")) / "suite.json") or {})
    return role.split(":")[0]


def run_rows(models_dir) -> list[dict]:
    """One row per run folder under models_dir (ablation studies included), finished or not."""
    rows = []
    for cfg_path in sorted(Path(models_dir).rglob(RunDir.CONFIG)):
        run = RunDir(cfg_path.parent)
        if run.path.name.startswith(".") or "broken-checkpoints" in run.path.parts:
            continue
        try:
            cfg, summary = run.config(), run.summary()
            plain, adapted = _best_score(run, False), _best_score(run, True)
        except (CompetitionError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # One damaged run folder is flagged in its own row; the board of the others goes on.
            rows.append({"run": str(run.path.relative_to(models_dir)), "state": f"broken: {str(e)[:120]}"})
            continue
        rows.append({
            "run": str(run.path.relative_to(models_dir)), "part": cfg.get("part"), "model": cfg.get("model"),
            "fold": cfg.get("fold"), "seed": cfg.get("seed"), "epochs": summary.get("epochs"),
            "state": "finished" if run.finished else ("training" if run.lock_holder(take_over=False) else "partial"),
            "held-out acc": summary.get("oof_accuracy"), "held-out acc TTA": summary.get("oof_tta_accuracy"),
            "TTA": summary.get("oof_tta"),
            "local OOD": plain and plain["ood_accuracy"], "local OOD +BN": adapted and adapted["ood_accuracy"],
            "unseen OOD": plain and plain.get("unseen_accuracy"),
            "suite": plain and Path(plain["ood_dir"]).name, "suite role": _role(plain) if plain else None,
            "train s": summary.get("training_loop_s"),
            "commit": (summary.get("commit") or "")[:8] + ("+" if summary.get("dirty") else ""),
        })
    return rows


def submission_rows(submissions_dir) -> list[dict]:
    rows = []
    for path in sorted(Path(submissions_dir).glob("*.json")):
        spec = read_json(path)
        if spec is None or (isinstance(spec, dict) and "members" in spec and not isinstance(spec["members"], list)):
            rows.append({"submission": path.stem, "members": f"broken sidecar: {path.name} does not read as "
                                                             f"competition.ensemble's JSON"})
            continue
        if not isinstance(spec, dict) or "members" not in spec:
            continue
        try:
            rows.append(_submission_row(spec, path))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            rows.append({"submission": path.stem, "members": f"broken sidecar: {type(e).__name__} {str(e)[:80]}"})
    return rows


def _submission_row(spec: dict, path: Path) -> dict:
    local = spec.get("local_score_adapted") or spec.get("local_score") or {}
    kaggle = [u for u in spec.get("kaggle", []) if u.get("public_score") is not None]
    return {
        "submission": spec.get("name", path.stem),
        "members": ", ".join(f"{m['name']} {m['weight']:.2f}" for m in spec["members"] if m["weight"] > 0),
        "settings": ", ".join(sorted({m.get("setting", "?") for m in spec["members"]})),
        "fit on": spec.get("fit_on", "clean"), "OOF acc": (spec.get("oof") or {}).get("accuracy"),
        "local OOD": local.get("ood_accuracy"),
    "suite role": _role({"ood_dir": spec.get("ood_dir", ""), **local}) if local else None,
        "Kaggle public": kaggle[-1]["public_score"] if kaggle else None,
        "uploads": len(spec.get("kaggle", [])), "created": spec.get("created"),
        "commit": (spec.get("commit") or "")[:8] + ("+" if spec.get("dirty") else ""),
    }


def table(rows: list[dict], sort_col: str, ascending: bool = False) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty or sort_col not in frame:  # only broken rows: nothing to sort by
        return frame
    return frame.sort_values(sort_col, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def markdown(frame: pd.DataFrame) -> str:
    """A markdown table: accuracies as percentages, missing figures as `-`."""
    if frame.empty:
        return "(none)\n"

    def cell(col, v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float) and ("acc" in col or "OOD" in col or "Kaggle" in col):
            return f"{100 * v:.2f}"
        return f"{v:.0f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def chart(runs: pd.DataFrame, subs: pd.DataFrame, path) -> Path:
    """Held-out vs local OOD accuracy of every scored run, and the submissions' local estimates."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    scored = runs.dropna(subset=["local OOD"]) if "local OOD" in runs else runs.iloc[0:0]
    for _, r in scored.iterrows():
        clean = r["held-out acc TTA"] if pd.notna(r["held-out acc TTA"]) else r["held-out acc"]
        ax.scatter(clean, r["local OOD"], color="tab:blue")
        if pd.notna(r["local OOD +BN"]):
            ax.scatter(clean, r["local OOD +BN"], color="tab:orange", marker="^")
        ax.annotate(r["run"], (clean, r["local OOD"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="held-out accuracy (clean)", ylabel="local OOD estimate", title="runs (circle plain, triangle +BN)")
    ax.grid(alpha=0.3)
    ax = axes[1]
    s = subs.dropna(subset=["local OOD"]) if "local OOD" in subs else subs.iloc[0:0]
    if not s.empty:
        ax.barh(s["submission"], s["local OOD"], color="tab:green", label="local OOD")
        for name, v in zip(s["submission"], s["local OOD"]):
            ax.annotate(f"{100 * v:.2f}", (v, name), fontsize=8, xytext=(3, 0), textcoords="offset points",
                        va="center")
        k = s.dropna(subset=["Kaggle public"])
        ax.scatter(k["Kaggle public"], k["submission"], color="black", zorder=3, label="Kaggle public")
        values = pd.concat([s["local OOD"], k["Kaggle public"]]).astype(float)
        # submissions differ by tenths of a point: an axis from 0 would hide it
        ax.set_xlim(max(0.0, values.min() - 0.05), min(1.0, values.max() + 0.03))
        ax.legend(fontsize=8, loc="lower right")
    ax.set(xlabel="accuracy", title="submissions")
    ax.grid(alpha=0.3, axis="x")
    return plots.save(fig, path, "competition board", dpi=100)


def stages(spec_path, suite_dir) -> str:
    """What each stage adds to a submission, on a labelled local suite: every member without and
    with TTA, the ensemble, and the ensemble with the adaptation the submission used."""
    import numpy as np

    from competition import data
    from competition.metrics import file_accuracy
    from competition.runs import Member, base_setting, members_from_json, ood_logits

    members, weights, spec = members_from_json(spec_path)
    suite = data.OodSet(suite_dir)

    def acc(ms, ws):
        try:
            return float(np.mean([file_accuracy(z, suite.labels) for _, z in ood_logits(ms, ws, suite)]))
        except CompetitionError:  # not predicted under that setting: shown as -
            return None

    rows = []
    for m in members:
        base = base_setting(m.setting)
        rows.append((f"member {m.name}, no TTA", acc([Member(m.name, m.runs, "none")], [1.0])))
        rows.append((f"member {m.name}, TTA {base}", acc([Member(m.name, m.runs, base)], [1.0])))
    plain = [Member(m.name, m.runs, base_setting(m.setting)) for m in members]
    rows.append((f"ensemble of {len(members)} (weights fitted on {spec.get('fit_on', 'clean')} OOF)", acc(plain, weights)))
    if any(m.setting != base_setting(m.setting) for m in members):
        rows.append(("ensemble + adaptation (" + ", ".join(sorted({m.setting for m in members})) + ")",
                     acc(members, weights)))
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    return (f"What each stage adds (local OOD accuracy on {suite.path}, {suite.labels.size} images x "
            f"{len(suite.files)} x 5; {suite.role()}; weights and adaptation were chosen on {spec.get('roles', {}).get('choose', 'out-of-fold images')}):"
            f"\n\n| stage | local OOD |\n|---|---:|\n"
            + "\n".join(f"| {name} | {fmt(v)} |" for name, v in rows) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--submissions-dir", default="submissions")
    p.add_argument("--sort", default="ood", choices=sorted(set(RUN_SORTS) | set(SUB_SORTS)),
                   help=f"runs: {', '.join(RUN_SORTS)}; submissions: {', '.join(SUB_SORTS)}")
    p.add_argument("--out", help="write OUT.md, OUT_runs.csv, OUT_submissions.csv and OUT.png too")
    p.add_argument("--fetch", action="store_true", help="first read your uploads' Kaggle scores (needs credentials)")
    p.add_argument("--competition", help="Kaggle competition slug for --fetch (default: $KAGGLE_COMPETITION)")
    p.add_argument("--stages", metavar="SUBMISSION_JSON", help="instead: what each stage adds to this submission")
    p.add_argument("--suite", help="with --stages: the labelled local suite to measure on")
    args = p.parse_args(argv)
    if args.stages:
        if not args.suite:
            p.error("--stages needs --suite DIR (a labelled local suite)")
        text = stages(args.stages, args.suite)
        print(text)
        return text
    if args.fetch:
        from competition import submit

        print(submit.fetch_scores(args.submissions_dir, args.competition))
    key = args.sort
    runs = table(run_rows(args.models_dir), RUN_SORTS.get(key, "local OOD"), ascending=key in ("time", "name"))
    subs = table(submission_rows(args.submissions_dir), SUB_SORTS.get(key, "local OOD"), ascending=key == "name")
    text = f"## Runs ({len(runs)})\n\n{markdown(runs)}\n## Submissions ({len(subs)})\n\n{markdown(subs)}"
    print(text)
    if args.out:
        save_text(f"{args.out}.md", text)
        runs.to_csv(f"{args.out}_runs.csv", index=False)
        subs.to_csv(f"{args.out}_submissions.csv", index=False)
        print(f"wrote {args.out}.md, {args.out}_runs.csv, {args.out}_submissions.csv, {chart(runs, subs, f'{args.out}.png')}")
    return runs, subs


if __name__ == "__main__":
    cli(main)()
