"""The package's shape: modules import downward only (no cycle, lazy imports included), the
layering the README's architecture section describes holds, no function grows past a page,
and every stage runs as `python -m competition.<stage>`."""
import ast
import sys
from pathlib import Path

import pytest

import background  # tests/background.py

PKG = Path(__file__).resolve().parent.parent / "competition"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
STAGES = ["folds", "train", "predict", "ensemble", "score", "submit", "ablate", "selftrain", "board", "pipeline"]
# Orchestrators drive other stages through their functions (the same code as their commands).
DRIVES = {"ablate": {"train"}, "selftrain": {"train", "predict", "ensemble", "score"}}
# Leaves: what the rest stands on; they import nothing of the package but files (and data).
LEAVES = {"files": set(), "adapt": {"specs"}, "loader": set(), "mobilenets": {"files"}, "runtime": {"files", "specs"},
          "plots": {"files"}, "augment": {"files", "specs"}, "config": {"files", "specs"}, "data": {"files"},
          "specs": {"files"},
          "optim": {"files", "models", "specs"}, "metrics": {"files", "data"}}


def imports(module: str) -> set[str]:
    """Package modules `module` imports anywhere in its file (top level or inside functions)."""
    deps = set()
    for n in ast.walk(ast.parse((PKG / f"{module}.py").read_text())):
        if isinstance(n, ast.ImportFrom) and n.module:
            if n.module == "competition":
                deps |= {a.name for a in n.names}
            elif n.module.startswith("competition."):
                deps.add(n.module.split(".")[1])
        elif isinstance(n, ast.Import):
            deps |= {a.name.split(".")[1] for a in n.names if a.name.startswith("competition.")}
    return {d for d in deps if d in MODULES and d != module}


def test_no_import_cycle():
    graph = {m: imports(m) for m in MODULES}
    order, done = [], set()

    def visit(m, path):
        if m in path:
            pytest.fail(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if m not in done:
            for d in sorted(graph[m]):
                visit(d, path + [m])
            done.add(m)
            order.append(m)

    for m in MODULES:
        visit(m, [])
    assert order.index("files") < order.index("train")  # a real order exists; stages come last


def test_layers():
    for leaf, allowed in LEAVES.items():
        assert imports(leaf) <= allowed, (leaf, imports(leaf) - allowed)
    assert "predict" not in imports("train")  # TTA lives in tta.py, used by both
    assert not imports("score") & {"ensemble", "predict"}
    assert not imports("ensemble") & {"score", "predict"}
    for m in MODULES:  # stages sit on top: nothing imports a stage but the orchestrators
        bad = imports(m) & (set(STAGES) - {"submit", "folds"}) - DRIVES.get(m, set())
        assert not bad, (m, bad)


def test_no_function_longer_than_a_page():
    long = []
    for m in MODULES:
        for n in ast.walk(ast.parse((PKG / f"{m}.py").read_text())):
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80:
                long.append(f"{m}.{n.name}: {n.end_lineno - n.lineno + 1} lines")
    assert not long, long


def test_run_folder_file_names_have_one_owner():
    # The names of a run folder's files are spelled only in runs.py (and documented in train.py).
    for m in MODULES:
        if m == "runs":
            continue
        text = (PKG / f"{m}.py").read_text()
        code = "\n".join(line for line in text.splitlines() if not line.strip().startswith("#"))
        for name in ('"oof_index.npy"', '"oof_tta_logits.npy"', '"config.yaml"', '"predict.json"',
                     '"test_logits.npy"', '"summary.json"', '"best.pt"', '"last.pt"', '"data_config.yaml"',
                     '"metrics.csv"', '"oof_logits.npy"', '"oof_ood_logits.npy"', '"oof_ood_index.npy"',
                     '"oof.npy"', '"oof_ood.npy"', '"test.npy"', '"score.json"', '"broken-checkpoints"',
                     '"test_labels.npy"', '"checkpoints"'):
            assert name not in code, (m, name)


# `python -m competition.<stage> --help` for every stage, in one interpreter instead of one per
# stage (each of those spent seconds importing torch): runpy.run_module(run_name="__main__",
# alter_sys=True) is what `python -m` runs. Before each stage the package's modules are dropped
# from sys.modules, so every stage imports what it needs itself, as in a process of its own;
# only the third-party libraries (torch, timm, ...) stay loaded between stages.
RUN_STAGES = """
import contextlib, io, json, runpy, sys, traceback
results = {}
for stage in sys.argv[1:]:
    for name in [m for m in sys.modules if m == "competition" or m.startswith("competition.")]:
        del sys.modules[name]
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = ["-m", "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("competition." + stage, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = "raised"
    results[stage] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def launch_stages(folder: Path) -> background.Started:
    return background.Started([sys.executable, "-c", RUN_STAGES, *STAGES, "models"], folder, timeout=300,
                              cwd=PKG.parent, beside=True)


@pytest.mark.start_early.with_args(launch_stages)  # with_args: a lone function argument would be decorated
def test_every_stage_runs_as_a_module(early):
    import json

    proc = early.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert list(results) == STAGES + ["models"]
    for stage, (code, out, err) in results.items():
        assert code == 0 and "usage" in out.lower(), (stage, code, err[-2000:])
