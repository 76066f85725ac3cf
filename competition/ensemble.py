"""Stage 4: weighted logit average of trained runs -> submissions/<name>.csv + <name>.json.

    python -m competition.ensemble 'models/part1-demo-digits-f*' 'models/part2-demo-digits-f*' --name demo \\
        --ood-dir data/ood-local/digits-n40
    python -m competition.ensemble 'models/part3-cifar100-f*-s0' 'models/part2-cifar100-f*-s0' --name p23 \\
        --ood-dir data/ood-test --adapt auto
    python -m competition.ensemble 'models/part*' --name equal --method equal --ood-dir data/ood-test

Runs that differ only in their fold (`<preset>-<dataset>-f<k>-s<seed>`) form one *member*: its
out-of-fold logits are the union of its runs' held-out folds (rows of the folds CSV), and its
test and OOD logits the mean of its fold models (the usual k-fold bagging). Each member uses one
prediction setting (predict's pred/<setting>/): its TTA (--tta, default the run's own) and, with
--adapt, adapted OOD logits (bn, tent, a variant such as tent-all: always; auto: per member,
whichever of plain and every adapted setting predicted for it (variants included) is best on its
corrupted out-of-fold images, printed as one line per member).

Three roles for labelled images (README): members *train* on their training folds; every choice
here (weights with --fit-on ood, --adapt auto) is made on the *choose* images, the corrupted
copies of the members' held-out folds (oof_ood); a labelled local suite passed as --ood-dir is
only *measured* on (its score goes in the JSON), never chosen on, so shuffling its labels
changes no decision.

Member weights (Caruana selection) are fitted on out-of-fold logits only, never on test data:
--fit-on ood (the default when every run was trained with ood_check) fits them on the corrupted
copies of held-out images, the leaderboard's kind of image; clean fits them on the held-out
fold itself. When members' rows differ (one preset on folds 0-4, another on fold 0), the rows
all members share are used, and the run says so.

The JSON sidecar records the runs, settings, weights, the adaptation choices and the estimates
behind them, each member's and the ensemble's OOF accuracy (clean and corrupted), clean test
accuracy, the local OOD score when --ood-dir is a labelled suite, the code's commit and library
versions, and the sha1 of every logits file used: re-scoring it later gives the same number or
says the logits changed. The CSV is validated with competition.submit.check_submission before
the command returns; an existing different submission of the same name is never overwritten.
"""
from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np

from competition import data, runtime, submit
from competition.adapt import ADAPTATIONS, PARAMS
from competition.files import CompetitionError, atomic_path, check_name, cli, count, read_json, save_json
from competition.metrics import accuracy, file_accuracy, log_loss, table_summary
from competition.runs import Member, RunDir, adaptation, base_setting, combine, expand_runs, file_hash, find_copies, \
    group_members, load_oof, member_oof_ood, member_test, num_classes, ood_logits, oof_labels, \
    parse_adaptation, setting_name, test_logits
from competition.specs import EnsembleSpec

# ---------------------------------------------------------------------------- weights


def fit_weights(logits: list[np.ndarray], labels: np.ndarray, rounds: int = 40) -> np.ndarray:
    """Member weights by greedy ensemble selection with replacement (Caruana et al. 2004).

    Why this rather than minimising log-loss over free weights: it climbs the leaderboard's
    own metric (accuracy), its weights are counts / rounds (non-negative, summing to 1, few
    degrees of freedom, so little room to overfit the OOF rows), and starting from the best
    single member while keeping the best step seen makes the ensemble's OOF accuracy at least
    that member's by construction. Accuracy ties are frequent on a few thousand rows, so
    log-loss breaks them, which also lets a member that sharpens good predictions in.
    """
    if not logits:
        raise CompetitionError("no members to ensemble")
    stack = np.stack([np.asarray(z, np.float32) for z in logits])  # (M, N, C)
    m = len(stack)
    if m == 1:
        return np.ones(1)

    def key(avg):  # larger is better
        return (accuracy(avg, labels), -log_loss(avg, labels))

    singles = [key(z) for z in stack]
    first = max(range(m), key=lambda i: singles[i])
    counts = np.zeros(m)
    counts[first] = 1
    total = stack[first].astype(np.float64)
    best_key, best_counts = singles[first], counts.copy()
    for _ in range(rounds):
        k = counts.sum()
        scores = [key((total + stack[i]) / (k + 1)) for i in range(m)]
        pick = max(range(m), key=lambda i: scores[i])
        total += stack[pick]
        counts[pick] += 1
        if scores[pick] > best_key:
            best_key, best_counts = scores[pick], counts.copy()
    return best_counts / best_counts.sum()


# ---------------------------------------------------------------------------- the ensemble


def shared_oof(members: list[Member], labels_all: np.ndarray, say=print):
    """(rows all members hold out, labels there, each member's OOF logits there, aligned?)."""
    common = members[0].oof_index
    for m in members[1:]:
        common = np.intersect1d(common, m.oof_index)
    if not len(common):
        raise CompetitionError("the members share no out-of-fold rows (trained on disjoint folds?): weights cannot "
                               "be fitted; train every member on at least one common fold")
    aligned = all(len(m.oof_index) == len(common) for m in members)
    if not aligned:
        say(f"note: members' out-of-fold rows differ ({', '.join(f'{m.name} {len(m.oof_index)}' for m in members)}); "
            f"weights are fitted on the {len(common)} rows all of them hold")
    oof = [m.oof_logits[np.searchsorted(m.oof_index, common)] for m in members]
    return common, labels_all[common], oof, aligned


def shared_oof_ood(members: list[Member], labels_all: np.ndarray):
    """(labels, each member's logits) of the corrupted held-out copies all members share: in each
    corruption and severity, the rows they all checked (train's ood_check), flattened."""
    per = [member_oof_ood(m) for m in members]
    if len({rows.shape[0] for rows, _ in per}) > 1:
        raise CompetitionError("the members' corrupted out-of-fold sets have different corruption counts: "
                               "use --fit-on clean")
    common = [functools.reduce(np.intersect1d, [rows[k] for rows, _ in per]) for k in range(len(per[0][0]))]
    if not sum(map(len, common)):
        raise CompetitionError("the members share no corrupted out-of-fold rows (other folds or ood_check sizes?): "
                               "use --fit-on clean")
    logits = [np.concatenate([z[k, np.searchsorted(rows[k], c)] for k, c in enumerate(common)]) for rows, z in per]
    return labels_all[np.concatenate(common)], logits


def _predicted(m: Member, setting: str, ood: data.OodSet | None) -> bool:
    """Whether every run of the member has current logits for the OOD files under `setting` (a
    setting chosen without them would fail when the CSV is written)."""
    try:
        for r in m.runs:
            if ood is not None:
                r.ood_logits_paths(ood, setting)
    except CompetitionError:
        return False
    return True


def adapted_settings(m: Member, base: str) -> list[str]:
    """Every adapted setting of `base` that predict wrote for all of the member's runs (bn, tent,
    ... and their variants: tent-all, shot-norm_head-ens0.99, bn0.5), cheapest first: BN before
    the learned objectives, fewer learning parameters first, weight ensembling after none. A
    folder whose name predict never writes is not a candidate."""
    shared = set.intersection(*({s for s in r.settings() if base_setting(s) == base and s != base}
                                for r in m.runs))
    parsed = {}
    for s in shared:
        try:
            parsed[s] = parse_adaptation(adaptation(s))
        except CompetitionError:
            continue  # a name predict never writes (a folder made by hand?): no command could redo it

    def cost(s):
        method, params, alpha, blend = parsed[s]
        return ADAPTATIONS.index(method), PARAMS.index(params), alpha is not None, alpha or 0.0, -blend, s

    return sorted(parsed, key=cost)


def choose_adaptation(members: list[Member], adapt: str, labels_all: np.ndarray | None = None, say=print,
                      ood: data.OodSet | None = None) -> dict:
    """Set each member's setting for `adapt`: none, an adaptation predict writes (bn, tent, shot,
    eata, or a variant: tent-all, ...; always that), or auto: per member, the setting (plain, or
    adapted: every one predicted for all its runs, variants included) with the best accuracy
    on its corrupted out-of-fold images (oof_ood, the *choose* images: copies of its held-out
    fold, 19 x 5 slices each adapted alone), printed as one line. Never on a local suite: that
    is the *measure*, and a choice made on it would make its figure optimistic. Returns the
    estimates behind each choice and the images they were made on."""
    choices = {}
    for m in members:
        base = base_setting(m.setting)
        if adapt != "auto":
            m.setting = base if adapt == "none" else f"{base}+{adapt}"
            continue
        if not all(r.has_oof_ood(base) for r in m.runs):
            # No choose images (trained with ood_check=0): nothing to choose on, and never the measure.
            # BN where it was predicted: it paid in every repeat measured (bench/NOTES.md).
            bn = f"{base}+bn"
            m.setting = bn if _predicted(m, bn, ood) else base
            choices[m.name] = {"chosen": adaptation(m.setting), "chosen_on": "nothing: no corrupted out-of-fold "
                               "images (ood_check=0); BN by default where predicted"}
            say(f"  {m.name}: no corrupted out-of-fold images to choose on (trained with ood_check=0): "
                f"{adaptation(m.setting)} by default (train with ood_check > 0 to choose)")
            continue
        candidates = [base] + [s for s in adapted_settings(m, base)
                               if all(r.has_oof_ood(s) for r in m.runs) and _predicted(m, s, ood)]
        est, rows = {}, 0
        for s in candidates:
            idx, z = member_oof_ood(Member(m.name, m.runs, s))
            est[s], rows = accuracy(z.reshape(-1, z.shape[-1]), labels_all[idx.reshape(-1)]), idx.size
        m.setting = max(candidates, key=lambda s: (est[s], -candidates.index(s)))  # a tie keeps the cheaper one
        choices[m.name] = {**{adaptation(s): est[s] for s in candidates}, "chosen": adaptation(m.setting),
                           "chosen_on": f"oof_ood: {rows} corrupted out-of-fold images (choose)"}
        say(f"  {m.name}: corrupted out-of-fold acc " + ", ".join(
            f"{est[s]:.4f} {adaptation(s) if s != base else 'plain'}" for s in candidates) +
            f" -> {adaptation(m.setting)} (chosen on {rows} choose images, not on any local suite)")
    return choices


def predictions(members: list[Member], weights, ood: data.OodSet, n_classes: int,
                balance: bool = False, copies: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(the submission's labels: argmax of the ensembled OOD logits (balanced per severity with
    `balance`; one per picture from all its copies with `copies`), file after file; the accuracy
    table (files x severities) when the OOD folder is a labelled local suite), checked before
    anything is written: logits of another class count than the runs' data config says would make
    a CSV of labels the check refuses only after writing it."""
    labels = ood.labels
    preds, table = [], []
    for src, z in ood_logits(members, weights, ood, balance, copies):
        if z.shape[1] != n_classes:
            raise CompetitionError(f"{members[0].runs[0] / RunDir.DATA_CONFIG} says num_classes {n_classes}, but the "
                                   f"members' logits for {src.name} have {z.shape[1]} classes (edited?): restore it "
                                   f"from the run's copy, or retrain the run")
        preds.append(z.argmax(1).astype(np.int64))
        if labels is not None:
            table.append(file_accuracy(z, labels))
    return np.concatenate(preds), (np.stack(table) if table else None)


def write_files(csv: Path, preds: np.ndarray, ood: data.OodSet, n_classes: int, info: dict) -> None:
    """The CSV and its JSON, both or neither: each is written and the CSV checked under a temporary
    name, then the JSON goes into place and the CSV last. A failure before leaves neither (the CSV
    used to stay behind without its JSON when its check failed); the JSON pins the CSV's sha1, so
    a CSV left from before beside a new JSON (a kill between the two renames) is told apart. A
    failed CSV rename (an OSError, not a kill) takes the new JSON back."""
    json_path, sha1 = csv.with_suffix(".json"), None
    try:
        with atomic_path(csv) as tmp_csv, atomic_path(json_path) as tmp_json:
            submit.write_submission(tmp_csv, preds, ood.rows)
            try:
                submit.check_submission(tmp_csv, ood_dir=ood.path, num_classes=n_classes, shape=ood.shape)
            except CompetitionError as e:  # the message names the file the user will look for
                raise CompetitionError(str(e).replace(str(tmp_csv), str(csv))) from None
            sha1 = file_hash(tmp_csv)
            save_json(tmp_json, {**info, "csv_sha1": sha1})
    except OSError:  # the JSON went into place and the CSV's rename failed: take this JSON back (neither)
        if sha1 is not None and read_json(json_path, {}, dict).get("csv_sha1") == sha1:
            json_path.unlink()
        raise


def checked_num_classes(members: list[Member]) -> int:
    """The runs' class count (runs.num_classes), once every run's data config states it as a whole
    number: "ten" or 3.5 in a data_config.yaml was a traceback."""
    for m in members:
        for run in m.runs:
            k = run.data_config()["num_classes"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 2:
                where = run / (RunDir.DATA_CONFIG if (run / RunDir.DATA_CONFIG).exists() else RunDir.CONFIG)
                raise CompetitionError(f"{where}: num_classes is {k!r}, not a whole number of classes >= 2 (train "
                                       f"writes it): restore it from the run's copy, or retrain the run")
    return num_classes(members)


def check_rows(members: list[Member], labels_all: np.ndarray) -> None:
    """Every run's out-of-fold index files name rows of the folds CSV, before any choice is made on
    them: labels_all[-1] is the last image's label, taken without a word."""
    for m in members:
        for run in m.runs:
            fix = f"restore it from the run's copy, or retrain {run.path} (then predict it)"
            for name, rows in ((RunDir.OOF_INDEX, run.oof_index()), (RunDir.OOF_OOD_INDEX, run.oof_ood_index())):
                if rows is not None:
                    data.check_rows(run / name, rows, len(labels_all), fix)


def check_classes(members: list[Member], n_classes: int) -> None:
    """Every member's out-of-fold logits have the runs' class count (their data config's)."""
    for m in members:
        if m.oof_logits.shape[1] != n_classes:
            raise CompetitionError(f"{m.runs[0] / RunDir.DATA_CONFIG} says num_classes {n_classes}, but the run's "
                                   f"out-of-fold logits have {m.oof_logits.shape[1]} classes (edited?): restore it "
                                   f"from the run's copy, or retrain the run")


def pinned_hashes(members: list[Member], ood: data.OodSet) -> dict:
    """sha1 of every logits file the submission is made of: re-scoring its JSON later checks them."""
    out = {}
    for m in members:
        for run in m.runs:
            paths = run.ood_logits_paths(ood, m.setting)
            out[str(run)] = {str(p.relative_to(run.path)): file_hash(p) for p in paths}
    return out


def sidecar(name: str, csv: Path, ood: data.OodSet, members: list[Member], weights, oof_fit: tuple,
            labels_all: np.ndarray, n_classes: int, method: str, rounds: int, fit_on: str) -> dict:
    """The JSON that says which runs, settings and weights made the CSV, and how each scores."""
    common, labels, oof, aligned = oof_fit
    ens_oof = combine(oof, weights)
    test = test_logits(members, weights)
    tests = {m.name: member_test(m) for m in members}
    return {
        "name": name, "csv": str(csv), "created": time.strftime("%Y-%m-%d %H:%M:%S"), **runtime.provenance(),
        "ood_dir": str(ood.path), "ood_files": len(ood.files), "ood_rows": ood.rows[0], "method": method,
        "rounds": rounds if method == "caruana" else None, "fit_on": fit_on, "num_classes": n_classes,
        "runs": [str(r) for m in members for r in m.runs],
        "weights": {m.name: round(float(w), 6) for m, w in zip(members, weights)},
        "members": [{"name": m.name, "runs": [str(r) for r in m.runs], "setting": m.setting,
                     "weight": round(float(w), 6), "oof_rows": int(len(m.oof_index)),
                     "oof_accuracy": accuracy(m.oof_logits, labels_all[m.oof_index]),
                     "oof_accuracy_common": accuracy(z, labels), "oof_logloss_common": log_loss(z, labels),
                     "test_accuracy": accuracy(*tests[m.name]) if tests[m.name] else None}
                    for m, w, z in zip(members, weights, oof)],
        "oof": {"rows": int(len(common)), "aligned": aligned, "accuracy": accuracy(ens_oof, labels),
                "logloss": log_loss(ens_oof, labels), "best_member_accuracy": max(accuracy(z, labels) for z in oof)},
        "test_accuracy": accuracy(*test) if test is not None else None,
        "logits_sha1": pinned_hashes(members, ood),
    }


def report(info: dict, say=print) -> None:
    fitted = (f"fitted on {info['fit_on']} out-of-fold images" if info["method"] == "caruana" else "equal weights")
    say(f"members ({fitted}):")
    for m in info["members"]:
        say(f"  {m['name']:<28} weight {m['weight']:.3f}  OOF acc {m['oof_accuracy_common']:.4f}  "
            f"({len(m['runs'])} run(s), {m['setting']})")
    line = f"ensemble OOF acc {info['oof']['accuracy']:.4f} (best member {info['oof']['best_member_accuracy']:.4f})"
    if info.get("oof_ood"):
        line += f", corrupted OOF acc {info['oof_ood']['accuracy']:.4f} (best member {info['oof_ood']['best_member']:.4f})"
    if info["test_accuracy"] is not None:
        line += f", clean test acc {info['test_accuracy']:.4f}"
    if "local_score" in info:
        line += f", OOD acc {info['local_score']['ood_accuracy']:.4f} on {Path(info['ood_dir']).name}"
    say(line)
    if info.get("balance"):
        say("  predicted classes balanced within each OOD file and severity (--balance)")
    if info.get("copies"):
        say(f"  copies (--copies): {info['copies_found']['words']}")
    say(f"  decisions made on: {info['roles']['choose']}")
    if "local_score" in info:
        say(f"  OOD acc measured on: {info['roles']['measure']}")


def roles(method: str, fit_on: str, adapt: str, ood: data.OodSet, oof_rows, ood_figures) -> dict:
    """Which images each decision was made on, and the role of the images the local score is on."""
    decisions = ([f"weights ({fit_on} out-of-fold)"] if method == "caruana" else []) + \
        (["adaptation"] if adapt == "auto" else [])
    corrupted = f"{ood_figures['rows']} corrupted out-of-fold images (oof_ood)" if ood_figures else None
    where = corrupted if fit_on == "ood" or (method == "equal" and adapt == "auto") else \
        f"{len(oof_rows)} clean out-of-fold images" + (f"; adaptation on {corrupted}" if adapt == "auto" else "")
    return {"choose": f"{' and '.join(decisions)}: {where}" if decisions else "nothing chosen (equal weights)",
            "measure": ood.role()}


def same_submission(old, new: dict) -> bool:
    """The same runs, settings, weights and logits: rewriting the CSV would change nothing."""
    if not isinstance(old, dict):
        return False
    keys = ("runs", "weights", "logits_sha1", "ood_dir", "fit_on", "method")
    return all(old.get(k) == new.get(k) for k in keys) and \
        all(bool(old.get(k)) == bool(new.get(k)) for k in ("balance", "copies")) \
        and [m.get("setting") for m in old.get("members", [])] == [m.get("setting") for m in new.get("members", [])]


def may_write(csv: Path, info: dict, overwrite: bool, say=print) -> bool:
    """Whether build writes `csv` and its JSON: not when they already hold this very submission; an
    existing different one only with overwrite, unless it is the remains of an interrupted write."""
    for path in (csv, csv.with_suffix(".json")):
        if path.is_dir():
            raise CompetitionError(f"{path} is a folder, where the submission's file goes: move or rename it, or "
                                   f"choose another --name")
    old = read_json(csv.with_suffix(".json"))
    if csv.exists() and same_submission(old, info):
        if old.get("csv_sha1") in (None, file_hash(csv)):  # None: written before the JSON pinned its CSV
            say(f"{csv}: unchanged (the same runs, settings, weights and logits); not rewritten")
            return False
        say(f"note: {csv} is not the CSV its JSON describes (a write interrupted between the two): replaced")
    elif csv.exists() and not csv.with_suffix(".json").exists():  # left by a version that wrote the JSON last
        say(f"note: {csv} has no {csv.with_suffix('.json').name} (a write interrupted before it): replaced")
    elif csv.exists() and not overwrite:
        raise CompetitionError(f"{csv} already exists and holds another submission: choose a new --name, or pass "
                               f"--overwrite to replace it (its JSON is replaced too)")
    return True


def copies_record(ood: data.OodSet) -> dict:
    """What --copies found in the OOD files, for the JSON and the report."""
    found = find_copies(ood)
    return {**found.summary(), "words": found.words()}


def fit(members: list[Member], labels_all: np.ndarray, method: str, rounds: int, fit_on: str, say=print):
    """(weights, clean OOF fit tuple, corrupted OOF figures or None): weights fitted on the clean
    or corrupted out-of-fold logits; both are reported."""
    oof_fit = shared_oof(members, labels_all, say)
    ood_fit = shared_oof_ood(members, labels_all) if fit_on == "ood" or all(
        r.oof_ood_index() is not None for m in members for r in m.runs) else None
    if method == "equal":
        weights = np.full(len(members), 1 / len(members))
    else:
        labels, logits = (ood_fit if fit_on == "ood" else (oof_fit[1], oof_fit[2]))
        weights = fit_weights(logits, labels, rounds)
    ood_figures = None if ood_fit is None else {
        "rows": int(len(ood_fit[0])), "accuracy": accuracy(combine(ood_fit[1], weights), ood_fit[0]),
        "best_member": max(accuracy(z, ood_fit[0]) for z in ood_fit[1])}
    return weights, oof_fit, ood_figures


def build(runs: list, name: str, ood_dir, out_dir="submissions", spec: EnsembleSpec | None = None,
          overwrite: bool = False, say=print, allow_partial: bool = False) -> Path:
    """Fit the weights as `spec` says (default EnsembleSpec(): caruana, each run's own TTA, no
    adaptation, fit_on auto), write submissions/<name>.csv and .json, validate the CSV; returns
    the CSV. An existing CSV is never overwritten by a different submission (a new --name, or overwrite)."""
    spec = spec or EnsembleSpec()
    method, rounds, adapt, fit_on = spec.method, spec.rounds, spec.adapt, spec.fit_on
    t0 = time.time()
    check_name(name, "--name")
    if adapt not in ("none", "auto"):
        try:
            parse_adaptation(adapt)
        except CompetitionError as e:
            raise CompetitionError(f"--adapt must be none, auto or an adaptation predict writes: {e}") from None
    members = group_members([r if isinstance(r, RunDir) else RunDir(r) for r in runs],
                            setting_name(spec.tta) if spec.tta else None)
    datasets = [c.get("dataset") for m in members for c in m.cfgs]
    ood = data.OodSet(ood_dir, data.OodSet.required_shape(ood_dir, datasets, allow_partial))
    labels_all, n_classes = oof_labels(members), checked_num_classes(members)
    check_rows(members, labels_all)
    choices = choose_adaptation(members, adapt, labels_all, say, ood)
    check_classes(load_oof(members), n_classes)
    if fit_on == "auto":  # the leaderboard scores corrupted images: fit there when every run has them
        fit_on = "ood" if all(r.oof_ood_index() is not None for m in members for r in m.runs) else "clean"
    weights, oof_fit, ood_figures = fit(members, labels_all, method, rounds, fit_on, say)
    csv = Path(out_dir) / f"{name}.csv"
    info = sidecar(name, csv, ood, members, weights, oof_fit, labels_all, n_classes, method, rounds, fit_on)
    info.update(adaptation=choices or adapt, balance=spec.balance, copies=spec.copies,
                **({"copies_found": copies_record(ood)} if spec.copies else {}),
                **({"oof_ood": ood_figures} if ood_figures else {}),
                roles=roles(method, fit_on, adapt, ood, oof_fit[0], ood_figures))
    if not may_write(csv, info, overwrite, say):
        return csv
    preds, table = predictions(members, weights, ood, n_classes, spec.balance, spec.copies)
    if table is not None:
        info["local_score"] = {**table_summary(table), "ood_dir": str(ood.path), "role": ood.role()}
    write_files(csv, preds, ood, n_classes, info)
    report(info, say)
    say(f"wrote {csv} ({sum(ood.rows)} rows, valid) and {csv.with_suffix('.json')} in {time.time() - t0:.1f} s")
    return csv


def main(argv=None):
    default = EnsembleSpec()  # the flags' defaults are the spec's
    p = argparse.ArgumentParser(prog="python -m competition.ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders or quoted glob patterns (runs differing only in fold "
                                           "form one member)")
    p.add_argument("--name", required=True, help="submission name: submissions/NAME.csv and NAME.json")
    p.add_argument("--ood-dir", default="data/ood-test", help="the distortionNN.npy files the CSV is for")
    p.add_argument("--tta", default=None, help="the TTA setting to use (default: each run's own, as predict's)")
    p.add_argument("--adapt", default=default.adapt,
                   help="adapted OOD logits (predict --adapt): none, bn, tent, shot, eata, a variant as predict names "
                        "it (tent-all, shot-norm_head-ens0.99, bn0.5), or auto: per member, whichever setting it "
                        "was predicted with pays on its corrupted out-of-fold images (the choose images; never a "
                        "local suite, which measures)")
    p.add_argument("--bn-adapt", action="store_const", const="bn", dest="adapt", help="the same as --adapt bn")
    p.add_argument("--balance", action="store_true",
                   help="balance the predicted classes within each OOD file and severity (Sinkhorn): for files "
                        "whose every severity holds each class equally, as the competition's do (each is CIFAR-100's "
                        "test split, 100 per class); score it on a suite built with `score suite --balanced`")
    p.add_argument("--copies", action="store_true",
                   help="predict each picture once from all its copies (the mean of their probabilities) where the "
                        "OOD files' cells hold the same pictures in one order, as the competition's (and CIFAR-100-C's, "
                        "and every local suite) do; which cells do is read from the images (competition.copies), and "
                        "a cell in no group keeps its own predictions")
    p.add_argument("--fit-on", default=default.fit_on, choices=("auto", "clean", "ood"),
                   help="weights fitted on clean or corrupted out-of-fold images (auto: corrupted when every run "
                        "has them, i.e. was trained with ood_check)")
    p.add_argument("--method", default=default.method, choices=("caruana", "equal"))
    p.add_argument("--rounds", type=count, default=default.rounds,
                   help="greedy selection rounds (weights are multiples of 1/k)")
    p.add_argument("--out-dir", default="submissions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing submission of this name")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept fewer OOD files or rows than the competition's 19 x 50,000 (cifar100 runs)")
    args = p.parse_args(argv)
    spec = EnsembleSpec(method=args.method, rounds=args.rounds, tta=args.tta, adapt=args.adapt, fit_on=args.fit_on,
                        balance=args.balance, copies=args.copies)
    return build(expand_runs(args.runs), args.name, args.ood_dir, args.out_dir, spec, args.overwrite,
                 allow_partial=args.allow_partial)


if __name__ == "__main__":
    cli(main)()
