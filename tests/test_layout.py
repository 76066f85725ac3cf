"""The package's shape: modules import downward only (no cycle, lazy imports included), the
layering the README's architecture section describes holds, no function grows past a page,
and every stage runs as `python -m competition.<stage>`."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "competition"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
STAGES = ["folds", "train", "predict", "ensemble", "score", "submit", "ablate", "selftrain", "board", "pipeline"]
# Orchestrators drive other stages through their functions (the same code as their commands).
DRIVES = {"ablate": {"train"}, "selftrain": {"train", "predict", "ensemble", "score"}}
# Leaves: what the rest stands on; they import nothing of the package but files (and data).
LEAVES = {"files": set(), "adapt": set(), "loader": set(), "mobilenets": {"files"}, "runtime": {"files"},
          "plots": {"files"}, "augment": {"files"}, "config": {"files"}, "data": {"files"},
          "optim": {"files", "models"}, "metrics": {"files", "data"}}


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


def test_every_stage_runs_as_a_module():
    procs = {stage: subprocess.Popen([sys.executable, "-m", f"competition.{stage}", "--help"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=PKG.parent)
             for stage in STAGES + ["models"]}
    for stage, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage" in out.lower(), (stage, err[-2000:])
