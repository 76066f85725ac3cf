"""The results board: every run and every submission in one table, best first.

    python -m competition.board                         # models/ and submissions/ of this folder
    python -m competition.board --sort ood              # runs by local OOD estimate (also: clean, time, ...)
    python -m competition.board --out submissions/board # also board.md, board_runs.csv, board_submissions.csv, board.png
    python -m competition.board --fetch --competition SLUG   # first fetch Kaggle's scores of your uploads
    python -m competition.board --stages submissions/x.json --suite data/ood-local/x   # what each stage adds

Runs: part, model, fold, seed, epochs, held-out accuracy (plain, and with the TTA train
validated), the local OOD estimate +- its standard error (plain, and test-time adapted on the
same suite: bn, tent, ... as scored by `competition.score --adapt`, and balanced or copies-combined
predictions as scored by `--balance` / `--copies`, which the column `adapted post` names), the
mean over the corruption families training did not see, training time and the commit that trained
it, and the role of the images each local figure is on (`measure`, or `choose` when a suite was built from a
held-out fold: optimistic). Runs not scored (or not predicted) yet show `-`; adapted settings
predicted on a suite but not scored there are listed under the tables with the command that
scores them; a broken run folder or sidecar is flagged in its row, instead of stopping the board.
Submissions: members and weights, how the weights were fitted, the local estimate of what they
submit (adapted when their members are), and the Kaggle public score once `competition.submit`
has uploaded it and `--fetch` read it back. board.png: every figure on one percent axis.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from competition import plots
from competition.files import CompetitionError, cli, read_json, save_text
from competition.runs import RunDir, adaptation, base_setting, honest_post, is_adaptation, recorded_balance, recorded_copies

RUN_SORTS = {"ood": "local OOD", "ood_adapted": "local OOD adapted", "ood_bn": "local OOD adapted",
             "clean": "held-out acc", "tta": "held-out acc TTA", "time": "train s", "name": "run"}
SUB_SORTS = {"ood": "local OOD", "kaggle": "Kaggle public", "oof": "OOF acc", "name": "submission"}


def _scores(run: RunDir) -> tuple[dict | None, dict | None]:
    """(plain, adapted): the run's newest local score without test-time adaptation, and the newest
    with one (bn, tent, ... and/or balanced or copies-combined predictions, `score --balance /
    --copies`) on the same suite, the same TTA first, so the two figures side by side differ by what
    was done at test time alone; with no plain score, the newest adapted one anywhere."""
    scores = run.scores()
    adapted = lambda s: any(adaptation(x) != "none" for x in s.get("settings", [])) or \
        bool(s.get("balance") or s.get("copies"))  # noqa: E731
    plain = next((s for s in scores if not adapted(s)), None)
    others = [s for s in scores if adapted(s)]
    if plain is not None:
        base = {base_setting(x) for x in plain.get("settings", [])}
        others = [s for s in others if s.get("ood_dir") == plain.get("ood_dir")]
        others.sort(key=lambda s: {base_setting(x) for x in s.get("settings", [])} != base)  # stable: newest first
    return plain, (others[0] if others else None)


def unscored(models_dir) -> list[str]:
    """A line per adapted setting predicted on a suite a run was scored on, but not scored there:
    the board has no figure for it until `competition.score --adapt` writes one."""
    out = []
    for run in _run_dirs(models_dir):
        pred = run.path / RunDir.PRED
        for score_json in sorted(pred.glob(f"*/ood/*/{RunDir.SCORE_JSON}")) if pred.is_dir() else []:
            setting, suite = score_json.parts[-4], score_json.parts[-2]
            if adaptation(setting) != "none":
                continue
            for other in sorted(pred.glob(f"*/ood/{suite}")):
                name = other.parts[-3]
                if base_setting(name) != setting or adaptation(name) == "none" or (other / RunDir.SCORE_JSON).exists():
                    continue
                ood_dir = (read_json(score_json) or {}).get("ood_dir", "SUITE")
                how = (f"python -m competition.score {run.path} --ood-dir {ood_dir} --tta {setting} --adapt "
                       f"{adaptation(name)}" if is_adaptation(adaptation(name)) and "-prob" not in setting
                       else "competition.score it with that adaptation")
                out.append(f"{run.path.relative_to(models_dir)}: {name} was predicted on {Path(ood_dir).name} but "
                           f"not scored, so the board has no adapted figure for it: {how}")
    return out


def _role(score: dict) -> str:
    """The first word of the role of a score's images (measure / choose / LEADERBOARD), read from
    the score or, for scores written before roles were recorded, from its suite's folder."""
    from competition import data

    if score.get("role"):
        return score["role"].split(":")[0]
    suite_json = Path(score.get("ood_dir", "")) / "suite.json"
    info = read_json(suite_json)
    if (info is None and suite_json.exists()) or (info is not None and not isinstance(info, dict)):
        return f"unreadable {suite_json}"  # flagged, not passed off as images of unknown origin
    return data.suite_role(info or {}).split(":")[0]


def _run_dirs(models_dir) -> list[RunDir]:
    """Every run folder under models_dir (ablation studies included), hidden and set-aside ones not."""
    runs = [RunDir(p.parent) for p in sorted(Path(models_dir).rglob(RunDir.CONFIG))]
    return [r for r in runs if not r.path.name.startswith(".") and r.broken_checkpoint_dir.name not in r.path.parts]


def run_rows(models_dir) -> list[dict]:
    """One row per run folder under models_dir (ablation studies included), finished or not."""
    rows = []
    for run in _run_dirs(models_dir):
        try:
            cfg, summary = run.config(), run.summary()
            plain, adapted = _scores(run)
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
            "local OOD": plain and plain["ood_accuracy"], "local OOD s.e.": plain and plain.get("ood_se"),
            "local OOD adapted": adapted and adapted["ood_accuracy"],
            "local OOD adapted s.e.": adapted and adapted.get("ood_se"),
            "adapted setting": adapted and ", ".join(adapted.get("settings", [])),
            "adapted post": adapted and ", ".join(k for k in ("balance", "copies") if adapted.get(k)) or None,
            "unseen OOD": plain and plain.get("unseen_accuracy"),
            "suite": (plain or adapted) and Path((plain or adapted)["ood_dir"]).name,
            "suite role": _role(plain or adapted) if plain or adapted else None,
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
        "settings": ", ".join(sorted({m.get("setting", "?") for m in spec["members"]}))
                    + (" +balance" if recorded_balance(spec) else "") + (" +copies" if recorded_copies(spec) else ""),
        "fit on": spec.get("fit_on", "clean"), "OOF acc": (spec.get("oof") or {}).get("accuracy"),
        "local OOD": local.get("ood_accuracy"), "local OOD s.e.": local.get("ood_se"),
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
    """A markdown table: accuracies as percentages, missing figures as `-`; a column's standard
    error (`X s.e.`) is printed in X's cell as `+- s.e.` instead of a column of its own."""
    if frame.empty:
        return "(none)\n"
    se_of = {c: f"{c} s.e." for c in frame.columns if f"{c} s.e." in frame.columns}
    shown = [c for c in frame.columns if c not in se_of.values()]

    def missing(v):
        return v is None or (isinstance(v, float) and math.isnan(v))

    def cell(col, v, row):
        if missing(v):
            return "-"
        if isinstance(v, float) and ("acc" in col or "OOD" in col or "Kaggle" in col):
            se = row.get(se_of.get(col))
            return f"{100 * v:.2f}" + ("" if missing(se) else f" +- {100 * se:.2f}")
        return f"{v:.0f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(c, row[c], row) for c in shown) + " |" for row in frame.to_dict("records")]
    return "\n".join(lines) + "\n"


def chart_rows(runs: pd.DataFrame, subs: pd.DataFrame) -> pd.DataFrame:
    """The board's figures the chart draws, one row per submission (first) and scored run, in
    percent: label, local estimate and its s.e., the adapted estimate (runs) and its s.e., the
    Kaggle public score (submissions, once fetched); NaN where a figure is absent."""
    from competition.tta import setting_words

    def get(frame, row, col):
        v = row.get(col) if col in frame else None
        return float("nan") if v is None or (isinstance(v, float) and math.isnan(v)) else 100 * float(v)

    out = []
    for _, r in subs.iterrows():
        settings = [x.strip() for x in str(r.get("settings") or "").split(",") if x.strip() and x.strip() != "?"]
        out.append({"kind": "submission", "label": f"{r['submission']}" + (
                        f"\n{setting_words(settings)}" if settings else ""),
                    "local": get(subs, r, "local OOD"), "se": get(subs, r, "local OOD s.e."),
                    "adapted": float("nan"), "adapted_se": float("nan"), "kaggle": get(subs, r, "Kaggle public")})
    for _, r in runs.iterrows():
        out.append({"kind": "run", "label": str(r.get("run")) + (
                        f"\n+ {setting_words(r['adapted setting']).split(' + ', 1)[-1]}"
                        if isinstance(r.get("adapted setting"), str) and r.get("adapted setting") else "") + (
                        f" + {r['adapted post']}" if isinstance(r.get("adapted post"), str) else ""),
                    "local": get(runs, r, "local OOD"), "se": get(runs, r, "local OOD s.e."),
                    "adapted": get(runs, r, "local OOD adapted"),
                    "adapted_se": get(runs, r, "local OOD adapted s.e."),
                    "kaggle": float("nan")})
    frame = pd.DataFrame(out, columns=["kind", "label", "local", "se", "adapted", "adapted_se", "kaggle"])
    return frame[frame[["local", "adapted", "kaggle"]].notna().any(axis=1)].reset_index(drop=True)


# The chart's series: (column of chart_rows, its s.e. column, marker, legend text, offset from the
# row's line so the markers of one row do not cover each other, decimals printed, text offset in points).
_SERIES = [("local", "se", dict(fmt="o", color="tab:blue"), "local OOD estimate\n+- 1 s.e. (labelled suite)",
            0.0, 1, 5),
           ("adapted", "adapted_se", dict(fmt="^", color="tab:orange"),
            "local OOD estimate,\ntest-time adapted, +- 1 s.e.", -0.18, 1, -12),
           ("kaggle", None, dict(fmt="D", color="black"), "Kaggle public score\n(the real OOD files)", 0.18, 2, 5)]


def chart(runs: pd.DataFrame, subs: pd.DataFrame, path) -> Path:
    """One chart of every run and submission with a figure: the local OOD estimate +- one
    standard error (plain, and adapted where scored), and the Kaggle public score where fetched,
    in percent. The axis runs from 0 unless every figure lies within a narrow band, and then its
    label says where it starts."""
    plt = plots.pyplot()
    rows = chart_rows(runs, subs)
    fig, ax = plt.subplots(figsize=(11, 1.8 + 0.42 * max(len(rows), 2)))
    if rows.empty:
        ax.text(0.5, 0.5, "no run or submission has a local score or a Kaggle score yet:\n"
                "python -m competition.score RUN --ood-dir SUITE, then board again", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return plots.save(fig, path, "competition board", dpi=100)
    y = -rows.index.to_numpy(dtype=float)  # the first row on top
    for col, se, style, label, dy, decimals, text_dy in _SERIES:
        have = rows[col].notna().to_numpy()
        if not have.any():
            continue  # absent data: no marker, no legend entry
        err = rows.loc[have, se].fillna(0).to_numpy() if se else None
        ax.errorbar(rows.loc[have, col], y[have] + dy, xerr=err, capsize=3, ms=6, lw=1.2, label=label, **style)
        for v, yy in zip(rows.loc[have, col], y[have] + dy):
            ax.annotate(f"{v:.{decimals}f}", (v, yy), xytext=(0, text_dy), textcoords="offset points", fontsize=7,
                        ha="center", color=style["color"])
    ax.set_yticks(y, rows["label"], fontsize=8)
    if (rows["kind"] == "submission").any() and (rows["kind"] == "run").any():
        ax.axhline(-(rows["kind"] == "submission").sum() + 0.5, color="0.6", lw=1)
    lo, hi, zoomed = _chart_range(rows)
    ax.set_xlim(lo, hi)
    ax.set_ylim(y.min() - 0.6, 0.6)
    ax.set_xlabel("accuracy on corrupted images, %" + (f"  (zoomed: the axis starts at {lo:g}%, not 0)" if zoomed
                                                        else ""))
    ax.grid(alpha=0.3, axis="x")
    n_subs = int((rows["kind"] == "submission").sum())
    ax.set_title(f"{n_subs} submission(s) on top, {len(rows) - n_subs} run(s) below; +- is one standard error over "
                 f"the suite's images", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, labelspacing=1.0)
    return plots.save(fig, path, "competition board", dpi=100)


def _chart_range(rows: pd.DataFrame) -> tuple[float, float, bool]:
    """(low, high, zoomed) of the chart's percent axis: 0..100 unless every figure (+- its s.e.)
    lies within 25 points, then a 5-point-aligned window around them (said on the axis)."""
    lows = pd.concat([rows["local"] - rows["se"].fillna(0), rows["adapted"] - rows["adapted_se"].fillna(0),
                      rows["kaggle"]]).dropna()
    highs = pd.concat([rows["local"] + rows["se"].fillna(0), rows["adapted"] + rows["adapted_se"].fillna(0),
                       rows["kaggle"]]).dropna()
    lo, hi = float(lows.min()), float(highs.max())
    if hi - lo >= 25:
        return 0.0, 100.0, False
    lo, hi = max(0.0, 5 * math.floor((lo - 2) / 5)), min(100.0, 5 * math.ceil((hi + 2) / 5))
    return lo, hi, lo > 0


def stages(spec_path, suite_dir) -> str:
    """What each stage adds to a submission, on a labelled local suite: every member without and
    with TTA, the ensemble, and the ensemble with the adaptation the submission used."""
    import numpy as np

    from competition import data
    from competition.metrics import file_accuracy
    from competition.runs import Member, base_setting, members_from_json, ood_logits

    members, weights, spec = members_from_json(spec_path)
    suite = data.OodSet(suite_dir)

    def acc(ms, ws, balance=False, copies=False):
        try:
            return float(np.mean([file_accuracy(z, suite.labels)
                                  for _, z in ood_logits(ms, ws, suite, balance, copies)]))
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
    if recorded_balance(spec):
        rows.append(("+ classes balanced per file and severity (--balance)", acc(members, weights, True)))
    if honest_post(spec, Path(spec_path), suite)["copies"]:
        rows.append(("+ one prediction per picture from all its copies (--copies)",
                     acc(members, weights, recorded_balance(spec), True)))
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    return (f"What each stage adds (local OOD accuracy on {suite.path}, {suite.labels.size} images x "
            f"{len(suite.files)} x 5; {suite.role()}; weights and adaptation were chosen on {spec.get('roles', {}).get('choose', 'out-of-fold images')}):"
            f"\n\n| stage | local OOD |\n|---|---:|\n"
            + "\n".join(f"| {name} | {fmt(v)} |" for name, v in rows) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m competition.board", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if not Path(args.models_dir).is_dir():  # an empty board would read as "no runs yet"
        raise CompetitionError(f"--models-dir {args.models_dir}: no such folder; pass the folder that holds the run "
                               f"folders (train writes them under models/ by default)")
    if args.fetch:
        from competition import submit

        print(submit.fetch_scores(args.submissions_dir, args.competition))
    key = args.sort
    runs = table(run_rows(args.models_dir), RUN_SORTS.get(key, "local OOD"), ascending=key in ("time", "name"))
    subs = table(submission_rows(args.submissions_dir), SUB_SORTS.get(key, "local OOD"), ascending=key == "name")
    text = f"## Runs ({len(runs)})\n\n{markdown(runs)}\n## Submissions ({len(subs)})\n\n{markdown(subs)}"
    notes = unscored(args.models_dir)
    if notes:
        text += "\nNot scored yet:\n\n" + "".join(f"- {n}\n" for n in notes)
    print(text)
    if args.out:
        save_text(f"{args.out}.md", text)
        runs.to_csv(f"{args.out}_runs.csv", index=False)
        subs.to_csv(f"{args.out}_submissions.csv", index=False)
        print(f"wrote {args.out}.md, {args.out}_runs.csv, {args.out}_submissions.csv, {chart(runs, subs, f'{args.out}.png')}")
    return runs, subs


if __name__ == "__main__":
    cli(main)()
