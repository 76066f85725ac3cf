"""Submission CSVs: write them, check them against the OOD files, send them to Kaggle.

The format (one row per OOD image, in file order):

    id,label
    distortion00_1_0,42          distortion{NN}_{severity}_{index}: file NN, severity 1..5,
    distortion00_1_1,7           index 0..N-1 within that severity (file rows are severity-major,
    ...                          so row r of a file with 5*N rows is severity r // N + 1, index r % N)
    distortion18_5_9999,3        label: class index 0..C-1

    python -m competition.submit --check submissions/demo.csv --ood-dir data/ood-test
    python -m competition.submit submissions/demo.csv -m "part 3, 5 folds" --competition SLUG --ood-dir data/ood-test

Submitting validates first, then uses the Kaggle API (the same call as
`kaggle competitions submit -c SLUG -f FILE -m MSG`). Credentials: ~/.kaggle/kaggle.json, or
KAGGLE_USERNAME + KAGGLE_KEY, or KAGGLE_API_TOKEN. The competition slug comes from
--competition, else the KAGGLE_COMPETITION environment variable.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from competition.data import COMPETITION_SHAPE, SEVERITIES, OodSet
from competition.files import CompetitionError, atomic_path, cli, count

HEADER = "id,label"
# [0-9], not \d: Python's \d also matches other scripts' digits ('٣', Arabic-Indic 3), which int() and
# numpy read as 3, so such a file passed --check; the format is ASCII digits, as write_submission writes.
ID_PATTERN = r"distortion([0-9]{2})_([1-9][0-9]*)_([0-9]+)"


def submission_ids(rows_per_file: list[int]) -> list[str]:
    """Ids in file order for OOD files of `rows_per_file` rows each (5*N: five severities of N)."""
    ids = []
    for f, rows in enumerate(rows_per_file):
        if rows <= 0 or rows % SEVERITIES:
            raise CompetitionError(f"distortion{f:02d}: {rows} rows is not a positive multiple of {SEVERITIES}")
        n = rows // SEVERITIES
        ids += [f"distortion{f:02d}_{s}_{i}" for s in range(1, SEVERITIES + 1) for i in range(n)]
    return ids


def write_submission(path, labels: np.ndarray, rows_per_file: list[int]) -> Path:
    """Write the CSV for `labels` (one class index per OOD row, in file order), atomically."""
    labels = np.asarray(labels)
    total = sum(rows_per_file)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CompetitionError(f"labels must be a 1-D integer array (argmax of the logits), got {labels.dtype} "
                               f"{labels.shape}")
    if len(labels) != total:
        raise CompetitionError(f"{len(labels)} labels for {total} OOD rows ({len(rows_per_file)} files); "
                               f"predict every row of every distortionNN.npy")
    if total and labels.min() < 0:
        raise CompetitionError(f"labels must be class indices >= 0, found {labels.min()}")
    path = Path(path)
    frame = pd.DataFrame({"id": submission_ids(rows_per_file), "label": labels.astype(np.int64)})
    with atomic_path(path, ".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return path


def csv_file(path) -> Path:
    """`path` as a Path, once it is a file: a folder or a missing path is one error naming it."""
    path = Path(path)
    if path.is_dir():
        raise CompetitionError(f"{path} is a folder, not a submission CSV: name the .csv file inside it")
    if not path.is_file():
        raise CompetitionError(f"{path} does not exist: write it with competition.ensemble (or write_submission)")
    return path


def read_csv(path) -> pd.DataFrame:
    """The CSV as text columns, after the checks Kaggle's parser would fail on: the encoding
    (UTF-8, with or without the BOM Excel adds), the exact header, readable rows."""
    path = csv_file(path)
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise CompetitionError(f"{path} is UTF-16 encoded (a BOM FF FE / FE FF); Kaggle expects UTF-8: save it as "
                               f"\"CSV UTF-8\", or write it with competition.ensemble")
    try:
        text = raw.decode("utf-8-sig")  # -sig: a BOM from Excel is not a header error
    except UnicodeDecodeError as e:
        raise CompetitionError(f"{path} is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}; Latin-1 or "
                               f"another legacy encoding?); Kaggle expects UTF-8: save it as \"CSV UTF-8\"") from None
    header = text.split("\n", 1)[0].rstrip("\r")
    if header != HEADER:
        raise CompetitionError(f"{path}: header is {header!r}, expected {HEADER!r} (exactly, first line)")
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as e:  # ragged rows, binary junk
        raise CompetitionError(f"{path} is not a readable CSV ({type(e).__name__}: {e})") from None
    if list(frame.columns) != ["id", "label"]:
        raise CompetitionError(f"{path}: columns {list(frame.columns)}, expected ['id', 'label']")
    if frame.empty:
        raise CompetitionError(f"{path} has a header but no rows")
    return frame


def check_submission(path, ood_dir=None, rows_per_file: list[int] | None = None, num_classes: int = 100,
                     shape: tuple[int, int] | None = None) -> pd.DataFrame:
    """Validate a submission CSV and return it (id: str, label: int64).

    Rows are checked against `ood_dir`'s files if given (data.OodSet's checks, with `shape` =
    (files, rows per file) required when given), else against `rows_per_file`, else against the
    ids' own files and counts. Row numbers in messages count data rows from 1, header excluded.
    """
    path = Path(path)
    frame = read_csv(path)
    ids = frame["id"].to_numpy()

    bad = np.flatnonzero(~frame["id"].str.fullmatch(ID_PATTERN).to_numpy(dtype=bool))
    if len(bad):
        r = bad[0]
        raise CompetitionError(f"{path}: row {r + 1}: id {ids[r]!r} is not of the form distortionNN_S_I "
                               f"(file NN, severity S 1..{SEVERITIES}, index I)")
    dup = np.flatnonzero(frame["id"].duplicated().to_numpy())
    if len(dup):
        r = dup[0]
        first = int(np.flatnonzero(ids == ids[r])[0])
        raise CompetitionError(f"{path}: row {r + 1}: id {ids[r]} appears again (first at row {first + 1}); "
                               f"each OOD image needs exactly one row")

    if ood_dir is not None:
        rows_per_file = OodSet(ood_dir, shape).rows
        source = f"the {len(rows_per_file)} files in {ood_dir}"
    elif shape is not None:
        rows_per_file, source = [shape[1]] * shape[0], f"the competition's {shape[0]} files of {shape[1]} rows"
    elif rows_per_file is not None:
        source = f"{len(rows_per_file)} OOD files of {'/'.join(map(str, sorted(set(rows_per_file))))} rows"
    else:
        rows_per_file, source = _rows_from_ids(frame["id"]), "the files its ids name"
    expected = np.asarray(submission_ids(rows_per_file), dtype=object)
    if len(ids) != len(expected):
        n = min(len(ids), len(expected))
        diff = np.flatnonzero(ids[:n] != expected[:n])
        where = (f"; first difference at row {diff[0] + 1}: id {expected[diff[0]]} expected, found {ids[diff[0]]}"
                 if len(diff) else f"; row {n + 1} onwards " + ("missing" if len(ids) < len(expected) else "extra"))
        raise CompetitionError(f"{path}: {len(ids)} rows, expected {len(expected)} for {source}{where}")
    diff = np.flatnonzero(ids != expected)
    if len(diff):
        r = diff[0]
        raise CompetitionError(f"{path}: row {r + 1}: id {expected[r]} expected, found {ids[r]}; rows must be in "
                               f"file order (distortion, then severity, then index)")

    labels = frame["label"]
    bad = np.flatnonzero(~labels.str.fullmatch(r"[0-9]+").to_numpy(dtype=bool))  # ASCII digits (ID_PATTERN)
    if len(bad):
        r = bad[0]
        raise CompetitionError(f"{path}: row {r + 1} ({ids[r]}): label {labels.iloc[r]!r} is not an integer "
                               f"class index 0..{num_classes - 1} written in ASCII digits 0-9")
    huge = labels.str.len().to_numpy() > 18  # would overflow int64; out of range in any case
    values = np.where(huge, "-1", labels.to_numpy()).astype(np.int64)
    bad = np.flatnonzero(huge | (values >= num_classes))
    if len(bad):
        r = bad[0]
        raise CompetitionError(f"{path}: row {r + 1} ({ids[r]}): label {labels.iloc[r]} is out of range "
                               f"0..{num_classes - 1} (wrong --num-classes, or labels not class indices?)")
    return pd.DataFrame({"id": frame["id"], "label": values})


def _rows_from_ids(ids: pd.Series) -> list[int]:
    """Rows per file implied by the ids alone: files 00..K-1 each with a multiple of 5 rows."""
    files = ids.str.slice(10, 12).astype(int)  # "distortionNN_..." -> NN
    counts = files.value_counts().sort_index()
    want = list(range(len(counts)))
    if list(counts.index) != want:
        missing = sorted(set(range(int(counts.index.max()) + 1)) - set(counts.index))
        raise CompetitionError(f"ids skip distortion{missing[0]:02d}: every OOD file 00..{counts.index.max():02d} "
                               f"needs its rows")
    freq = counts.value_counts()  # the most frequent count; ties go to the larger (rows go missing more than extra)
    common = int(max(freq.index, key=lambda c: (freq[c], c)))
    for f, c in counts.items():
        if c != common or c % SEVERITIES:
            why = (f"the other files have {common}" if c != common else f"not a multiple of {SEVERITIES} severities")
            where = "rows are missing" if c < common or c % SEVERITIES else "rows are extra"
            raise CompetitionError(f"distortion{f:02d} has {c} rows but {why}: {where} (every OOD file holds the same "
                                   f"images at {SEVERITIES} severities; pass --ood-dir to find which)")
    return [common] * len(counts)


def resolve_competition(competition: str | None) -> str:
    """The competition slug: the argument, else $KAGGLE_COMPETITION, else a clear error."""
    competition = competition or os.environ.get("KAGGLE_COMPETITION")
    if not competition:
        raise CompetitionError("no competition: pass --competition SLUG (the name in "
                               "kaggle.com/competitions/SLUG) or set KAGGLE_COMPETITION")
    return competition


def _kaggle_api():
    """An authenticated Kaggle API client. kaggle is imported here, not at the top: it
    authenticates on import, so the rest of this module works without credentials."""
    how = ("set credentials: save kaggle.json (kaggle.com -> Settings -> API -> Create New Token) to "
           "~/.kaggle/kaggle.json (chmod 600), or export KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN)")
    # kaggle prints its help and calls exit(1) when no credentials are found (2.x; 1.x raises
    # OSError on import): capture both so the user gets one line.
    noise = io.StringIO()
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            import kaggle

            api = kaggle.api
            api.authenticate()
    except ImportError as e:
        raise CompetitionError(f"the kaggle package is not usable ({e}): pip install kaggle six") from None
    except (Exception, SystemExit) as e:
        detail = f" ({type(e).__name__}: {e})" if not isinstance(e, SystemExit) else ""
        raise CompetitionError(f"Kaggle authentication failed{detail}; {how}") from None
    return api


def kaggle_submit(path, message: str, competition: str | None = None) -> str:
    """Submit `path` to a Kaggle competition; returns Kaggle's reply, and records the upload in
    the submission's JSON sidecar (for the board and fetch_scores).

    `competition` defaults to the KAGGLE_COMPETITION environment variable."""
    competition = resolve_competition(competition)
    path = csv_file(path)
    read_sidecar(path)  # record_upload appends to it once the upload is spent: a bad one is refused first
    api = _kaggle_api()
    try:
        reply = api.competition_submit(str(path), message, competition)
    except Exception as e:  # 401 bad key, 403 rules not accepted, 404 wrong slug, no network
        if network_error(e):
            raise CompetitionError(f"could not reach Kaggle ({type(e).__name__}): no network, a proxy in the way, or "
                                   f"no answer in time; if the upload had started, check "
                                   f"kaggle.com/competitions/{competition}/submissions before trying again "
                                   f"(a daily submission may have been spent)") from None
        raise CompetitionError(f"Kaggle refused {path.name} for competition {competition!r} ({type(e).__name__}: "
                               f"{e}); check the slug, that you accepted the competition's rules, and the "
                               f"daily submission limit") from None
    text = getattr(reply, "message", None) or str(reply)
    if "Could not submit" in text:
        raise CompetitionError(f"Kaggle upload of {path} failed: {text}; try again")
    record_upload(path, competition, message, text)
    return text


def network_error(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from) means Kaggle was never reached: a refused
    or dropped connection, a timeout, a name that does not resolve (requests/urllib3 wrap these)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names = {c.__name__ for c in type(e).__mro__}
        if isinstance(e, (ConnectionError, TimeoutError)) or names & {"ConnectionError", "Timeout", "MaxRetryError",
                                                                      "NewConnectionError", "NameResolutionError",
                                                                      "gaierror"}:
            return True
        e = e.__cause__ or e.__context__
    return False


def record_upload(csv: Path, competition: str, message: str, reply: str) -> None:
    """Append the upload to <csv>.json (a minimal one when the CSV has no sidecar)."""
    import time

    from competition.files import save_json

    sidecar = Path(csv).with_suffix(".json")
    spec = read_sidecar(csv) or {"name": Path(csv).stem, "csv": str(csv)}
    spec.setdefault("kaggle", []).append({"competition": competition, "file": Path(csv).name, "message": message,
                                          "uploaded": time.strftime("%Y-%m-%d %H:%M:%S"), "reply": reply,
                                          "public_score": None, "private_score": None})
    save_json(sidecar, spec)


def _field(obj, *names):
    for n in names:  # the Kaggle client's objects and dicts spell fields in camelCase or snake_case by version
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if v not in (None, ""):
            return v
    return None


def fetch_scores(submissions_dir="submissions", competition: str | None = None, api=None) -> str:
    """Read your submissions' scores back from Kaggle (`kaggle competitions submissions`) into
    every sidecar that recorded an upload of that file and message; returns a summary line."""
    from competition.files import save_json

    competition = resolve_competition(competition)
    api = api or _kaggle_api()
    try:
        remote = api.competition_submissions(competition)
    except Exception as e:
        raise CompetitionError(f"could not list your submissions of {competition!r} ({type(e).__name__}: {e})") from None
    found = {}
    for r in remote or []:
        key = (_field(r, "fileName", "file_name"), _field(r, "description"))
        found.setdefault(key, r)  # newest first: Kaggle lists the latest upload of a file first
    updated = 0
    for sidecar in sorted(Path(submissions_dir).glob("*.json")):
        spec = read_sidecar(sidecar)
        if not spec or not spec.get("kaggle"):
            continue
        changed = False
        for up in spec["kaggle"]:
            r = found.get((up["file"], up["message"]))
            score = r is not None and _field(r, "publicScore", "public_score")
            if score not in (None, False, ""):
                up["public_score"] = float(score)
                private = _field(r, "privateScore", "private_score")
                up["private_score"] = float(private) if private not in (None, "") else None
                up["status"] = str(_field(r, "status") or "")
                changed = True
        if changed:
            save_json(sidecar, spec)
            updated += 1
    return f"Kaggle: {len(remote or [])} submission(s) of {competition}; scores written into {updated} sidecar(s)"


def read_sidecar(csv) -> dict | None:
    """The CSV's JSON sidecar (competition.ensemble writes it), or None when there is none or it is
    not JSON (as before); JSON of another shape is one error naming it, not a traceback where a
    key is used: an object, "runs" a list of run folders, "ood_dir" a folder, "kaggle" a list of
    upload records."""
    from competition.files import read_json

    path = Path(csv).with_suffix(".json")
    spec = read_json(path)
    if spec is None:
        return None
    why = None if isinstance(spec, dict) else f"it holds a JSON {type(spec).__name__}"
    for key, kind, item in (("runs", list, str), ("ood_dir", str, None), ("kaggle", list, dict)):
        value = spec.get(key) if why is None else None
        if value is not None and not isinstance(value, kind):
            why = f"its {key!r} is a JSON {type(value).__name__}, not a {kind.__name__}"
        elif item is not None and value is not None and not all(isinstance(v, item) for v in value):
            why = f"its {key!r} holds other than {'folder names' if item is str else 'objects'}"
    if why:
        raise CompetitionError(f"{path} is not the JSON competition.ensemble writes beside a submission CSV ({why}): "
                               f"restore it, rebuild the submission with competition.ensemble, or delete it (the CSV "
                               f"is then checked on its own)")
    return spec


def expected_shape(csv, ood_dir, allow_partial: bool, submitting: bool) -> tuple[int, int] | None:
    """The competition's shape, when the CSV is for it: its sidecar JSON names runs trained on
    cifar100, or it goes to Kaggle without a sidecar (this pipeline's competition is CIFAR-100's)."""
    if submitting and not allow_partial:  # an upload spends a daily submission: only the real test set's shape
        return COMPETITION_SHAPE
    sidecar = read_sidecar(csv)
    if sidecar is None:
        return None if allow_partial or not submitting or (ood_dir and OodSet(ood_dir).is_suite) else COMPETITION_SHAPE
    from competition.runs import RunDir

    runs = [RunDir(r) for r in sidecar.get("runs", [])]
    datasets = [r.config().get("dataset") for r in runs if (r / RunDir.CONFIG).exists()]
    return OodSet.required_shape(ood_dir or sidecar.get("ood_dir", ""), datasets, allow_partial)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m competition.submit",
                                description="Check a submission CSV, or check and submit it to Kaggle.",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", help="submission CSV to check and submit")
    p.add_argument("--check", metavar="FILE", help="only check FILE, do not submit")
    p.add_argument("-m", "--message", help="submission message (required to submit)")
    p.add_argument("--competition", help="Kaggle competition slug (default: $KAGGLE_COMPETITION)")
    p.add_argument("--ood-dir", help="folder of distortionNN.npy to check row counts against")
    p.add_argument("--num-classes", type=count, default=100)
    p.add_argument("--allow-partial", action="store_true",
                   help="accept fewer files or rows than the competition's 19 x 50,000 (a test on part of the data)")
    args = p.parse_args(argv)

    path = args.check or args.file
    if path is None:
        p.error("give a FILE to submit, or --check FILE")
    if args.check and args.file:
        p.error("--check FILE checks only; give either --check FILE or FILE -m MSG")
    if not args.check and not args.message:
        p.error("submitting needs -m MESSAGE (or use --check FILE to only check)")
    # Before the check, which takes seconds on 950,000 rows.
    competition = None if args.check else resolve_competition(args.competition)
    frame = check_submission(path, ood_dir=args.ood_dir, num_classes=args.num_classes,
                             shape=expected_shape(path, args.ood_dir, args.allow_partial, submitting=not args.check))
    files = frame["id"].str.slice(10, 12).nunique()
    against = f"the OOD files in {args.ood_dir}" if args.ood_dir else "its own ids (pass --ood-dir to check counts)"
    print(f"ok: {path}: {len(frame)} rows, {files} files x {SEVERITIES} severities, "
          f"{frame['label'].nunique()} distinct labels; checked against {against}")
    if args.check:
        return
    print(kaggle_submit(path, args.message, competition))


if __name__ == "__main__":
    cli(main)()
