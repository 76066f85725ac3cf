"""Help and README that tell the truth: every command example in README.md, in each entry
point's --help text (its docstring, description and epilog) and in run.sh's header names only
flags its entry point accepts, entry points and source paths that exist, presets that exist and
config keys base.yaml has; and every --help usage line says `python -m competition.X`, the way
the stages are run, not `X.py`.

The parsers are the real ones: each entry point's main() is called with its parse_args
replaced by a catch, so the parser it builds is inspected without running anything (all of them
in a few seconds, instead of a `--help` subprocess per module). run.sh's options are read from
its own `case` loop. Placeholders are fine: CAPITALS, <angle>, `...`.
"""
from __future__ import annotations

import argparse
import importlib
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "competition"
README = ROOT / "README.md"
RUN_SH = ROOT / "run.sh"

ENTRY_POINTS = sorted(p.stem for p in PACKAGE.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
OVERRIDE_TAKERS = {"train", "ablate", "pipeline", "run.sh"}  # entry points whose key=value arguments are config overrides
# --help usage lines that cannot be mended in this change (the modules are being edited elsewhere): strict, so
# the day they say `python -m competition.X` this list has to shrink.
USAGE_PENDING: set[str] = set()


# ---------------------------------------------------------------------------- the real parsers
class _Built(Exception):
    """Raised instead of parsing: carries the parser main() built."""

    def __init__(self, parser):
        super().__init__("parser built")
        self.parser = parser


def build_parser(module: str) -> argparse.ArgumentParser:
    """The parser `python -m competition.<module>` builds, with argparse's prog as a user sees it
    (sys.argv[0] is the module's file under -m), without running the module."""
    def catch(self, *args, **kwargs):
        raise _Built(self)

    saved_argv = sys.argv
    saved = {name: getattr(argparse.ArgumentParser, name) for name in
             ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")}
    sys.argv = [str(PACKAGE / f"{module}.py"), "--help"]  # --help: should a main not parse, it prints, never runs
    for name in saved:
        setattr(argparse.ArgumentParser, name, catch)
    try:
        mod = importlib.import_module(f"competition.{module}")
        if callable(getattr(mod, "main", None)):
            mod.main(["--help"])
        else:  # main() defined under `if __name__ == "__main__"` only
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": re-run as __main__ on purpose
                runpy.run_module(f"competition.{module}", run_name="__main__")
    except _Built as built:
        return built.parser
    except SystemExit:
        pass
    finally:
        sys.argv = saved_argv
        for name, method in saved.items():
            setattr(argparse.ArgumentParser, name, method)
    raise AssertionError(f"competition.{module}: main() did not build its parser with argparse")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def help_text(parser: argparse.ArgumentParser) -> str:
    return "\n".join([parser.format_help(), *(sub.format_help() for sub in subparsers(parser).values())])


def run_sh_module(text: str) -> str | None:
    """The entry point run.sh hands its arguments to (`exec python -m competition.X "$@"`), if it does."""
    m = re.search(r"^[^#\n]*\bexec\b[^\n]*-m\s+competition\.(\w+)[^\n]*\"\$@\"", text, re.M)
    return m.group(1) if m else None


def run_sh_options(text: str) -> set[str]:
    """The options run.sh's own argument loop accepts: the patterns of its `case $1 in` branches
    (none when it hands its arguments to an entry point)."""
    if "while [[ $# -gt 0 ]]" not in text:
        return set()
    loop = text[text.index("while [[ $# -gt 0 ]]"):]
    loop = loop[:loop.index("\ndone")]
    return {flag for pattern in re.findall(r"^\s*((?:-{1,2}[A-Za-z][\w-]*\|?)+)\)", loop, re.M)
            for flag in pattern.split("|") if flag}


def run_sh_help(text: str) -> str:
    """What `./run.sh --help` prints: the comment header up to `set -euo`."""
    header = text[text.index("\n") + 1:text.index("set -euo")]
    return "\n".join(re.sub(r"^# ?", "", line) for line in header.splitlines())


class Spec:
    """What the documentation is checked against: the parsers, run.sh's options, presets, keys."""

    def __init__(self, parsers: dict, run_sh: set[str], presets: set[str], keys: set[str],
                 run_sh_module: str | None = None):
        self.parsers, self.run_sh, self.presets, self.keys = parsers, run_sh, presets, keys
        self.run_sh_module = run_sh_module  # run.sh is this entry point (its options are the parser's)


@pytest.fixture(scope="module")
def spec() -> Spec:
    from competition.config import base_config

    presets = {p.stem for p in (PACKAGE / "configs").glob("*.yaml")}
    text = RUN_SH.read_text()
    module = run_sh_module(text)
    assert module is None or module in ENTRY_POINTS, f"run.sh runs competition.{module}, which is no entry point"
    return Spec({m: build_parser(m) for m in ENTRY_POINTS}, run_sh_options(text), presets, set(base_config()), module)


# ---------------------------------------------------------------------------- finding the commands
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # one span, possibly wrapped onto a second line
START = re.compile(r"(?:\bpython3?\s|\baccelerate\s+launch\b|\btorchrun\s|(?<![\w/])\./run\.sh\b|\bbash\s+\S+\.sh\b)")


def _segments(line: str) -> list[str]:
    """The shell commands of one line: comments dropped, split at && || ; | and $( )."""
    line = re.sub(r"(^|\s)#.*", "", line)
    return [s for s in re.split(r"&&|\|\||;|\||\$\(|\)\s*$", line) if s.strip()]


def _join_continuations(text: str) -> list[str]:
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def commands_in_block(text: str) -> list[str]:
    """Commands in a code block or a help text: from where a command starts to the line's end."""
    found = []
    for line in _join_continuations(text):
        for segment in _segments(line):
            m = START.search(segment)
            if m:
                found.append(segment[m.start():].split("`")[0].strip())  # a help text's inline span ends at `
    return found


def commands_in_inline(span: str, stages) -> list[str]:
    """An inline code span: a command, or a stage's abbreviated one (`predict --adapt bn`,
    `competition.ensemble --fit-on ood`), which names that stage's flags just the same."""
    span = " ".join(span.split())
    m = re.match(rf"(?:competition\.)?({'|'.join(map(re.escape, stages))}) (.*)", span)
    if m and not START.match(span):
        return [f"python -m competition.{m.group(1)} {m.group(2)}"]
    return commands_in_block(span) if START.match(span) else []


def commands_in_markdown(text: str, stages=ENTRY_POINTS) -> list[str]:
    found = []
    for block in FENCE.findall(text):
        found += commands_in_block(block)
    prose = FENCE.sub("", text)
    for span in INLINE.findall(prose):
        found += commands_in_inline(span, stages)
    return found


# ---------------------------------------------------------------------------- checking them
def placeholder(token: str) -> bool:
    return "<" in token or "..." in token or "*" in token or re.fullmatch(r"[A-Z][A-Z0-9_]*", token) is not None


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote in prose: words are enough to find flags
        return text.split()


def target_of(tokens: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(what the command runs: an entry point name, 'run.sh' or a script path; a problem; its arguments)."""
    for i, tok in enumerate(tokens):
        rest = tokens[i + 1:]
        if tok in ("./run.sh", "run.sh") or tok.endswith("/run.sh"):
            return "run.sh", None, rest
        if tok == "-m" and rest:
            module = rest[0]
            if not module.startswith("competition."):
                return None, None, []  # python -m pip, pytest, ...: not ours
            name = module.split(".", 1)[1]
            if placeholder(name):
                return None, None, []
            if name not in ENTRY_POINTS:
                exists = (PACKAGE / f"{name}.py").exists()
                return None, (f"`{module}` is {'not an entry point' if exists else 'no module'} "
                              f"(entry points: {', '.join(ENTRY_POINTS)})"), []
            return name, None, rest[1:]
        if re.fullmatch(r"[\w./<>-]+\.(py|sh)", tok):
            if placeholder(tok):
                return None, None, []
            path = ROOT / tok
            if not path.is_file():
                hint = f"; run it as `python -m competition.{Path(tok).stem}`" if (PACKAGE / Path(tok).name).exists() \
                    else ""
                return None, f"{tok}: no such file{hint}", []
            if path.parent == PACKAGE and path.stem in ENTRY_POINTS:
                return path.stem, None, rest
            return None, None, []  # bench scripts and the like: the path exists, their flags are theirs
    return None, None, []


def check_command(command: str, spec: Spec) -> list[str]:
    """What is wrong with one documented command (nothing: [])."""
    target, problem, args = target_of(_tokens(command))
    if problem:
        return [problem]
    if target is None:
        return []
    label = target
    if target == "run.sh" and spec.run_sh_module:
        target, label = spec.run_sh_module, f"run.sh (competition.{spec.run_sh_module})"
    if target == "run.sh":
        known, takes_sub = spec.run_sh | {"-h", "--help"}, {}
    else:
        parser = spec.parsers[target]
        known, takes_sub = set(parser._option_string_actions), subparsers(parser)
        positional = [a for a in args if not a.startswith("-")]
        if takes_sub:  # a subcommand's flags, or any subcommand's when it is implied (score TARGET...)
            chosen = [takes_sub[positional[0]]] if positional and positional[0] in takes_sub else takes_sub.values()
            for sub in chosen:
                known |= set(sub._option_string_actions)
    problems = []
    for i, arg in enumerate(args):
        if re.match(r"--?[A-Za-z]", arg):
            flag = arg.split("=", 1)[0]
            if flag not in known and not placeholder(flag.lstrip("-")):
                problems.append(f"{flag} is not an option of {label} (it has {', '.join(sorted(known))})")
            per_part = target == "pipeline"  # the pipeline's --preset P also means part<N>_P per part
            if flag == "--preset" and i + 1 < len(args) and not placeholder(args[i + 1]) \
                    and args[i + 1] not in spec.presets \
                    and not (per_part and any(p.endswith(f"_{args[i + 1]}") for p in spec.presets)):
                problems.append(f"--preset {args[i + 1]}: no competition/configs/{args[i + 1]}.yaml")
        elif target in OVERRIDE_TAKERS and re.fullmatch(r"[a-z_][\w.]*=.*", arg):
            key = arg.split("=", 1)[0].split(".")[0]
            if key not in spec.keys:
                problems.append(f"{arg}: {key} is not a config key (competition/configs/base.yaml)")
    return problems


SOURCE_PATH = re.compile(r"(?<![\w/.-])((?:competition|tests|bench)/[\w./<>*-]*\.(?:py|yaml|sh|md))\b")


def check_paths(text: str) -> list[str]:
    """Source paths a text names (competition/..., tests/..., bench/...) that do not exist."""
    return [f"{p}: no such file" for p in sorted(set(SOURCE_PATH.findall(text)))
            if not placeholder(p) and not re.search(r"[A-Z]{2,}", p) and not (ROOT / p).exists()]


def usage_problems(parser: argparse.ArgumentParser, module: str) -> list[str]:
    """Usage lines (the parser's and its subcommands') that do not start `python -m competition.<module>`."""
    lines = [(parser, f"usage: python -m competition.{module}")]
    lines += [(sub, f"usage: python -m competition.{module} {name}") for name, sub in subparsers(parser).items()]
    return [p.format_usage().strip() for p, want in lines if not p.format_usage().startswith(want)]


def problems_in(commands: list[str], spec: Spec) -> list[str]:
    return [f"`{c}`: {p}" for c in commands for p in check_command(c, spec)]


# ---------------------------------------------------------------------------- the tests
def test_the_checker_catches_made_up_flags_modules_and_paths(spec):
    text = """
```bash
python -m competition.folds --dataset digits --made-up-flag 3     # a comment --also-made-up
./run.sh --dataset digits --no-such-option
python -m competition.nonexistent --k 5
python train.py --part 1
python -m competition.train --part 1 --preset no_such_preset epochs=2 no_such_key=1
```
Inline: `predict --adapt bn --tent-stepz 2`, `python -m competition.score suite --out D --ood-dir X`,
and a path `competition/configs/nothing.yaml`.
"""
    found = "\n".join(problems_in(commands_in_markdown(text), spec) + check_paths(text))
    for expected in ("--made-up-flag is not an option of folds", "--no-such-option is not an option of run.sh",
                     "`competition.nonexistent` is no module", "train.py: no such file; run it as "
                     "`python -m competition.train`", "no competition/configs/no_such_preset.yaml",
                     "no_such_key is not a config key", "--tent-stepz is not an option of predict",
                     "--ood-dir is not an option of score", "competition/configs/nothing.yaml: no such file"):
        assert expected in found, f"{expected!r} not reported in:\n{found}"
    assert "--also-made-up" not in found  # comments are prose
    # ... and the same commands, spelled right, pass
    good = """```bash
python -m competition.folds --dataset digits --k 5
./run.sh --dataset cifar100 --parts 2,3 epochs=2 KEY=VALUE
python -m competition.train --part 1 --preset part1_cpu model_args.stem=imagenet data=PATH
accelerate launch --num_processes 8 competition/train.py --part 2 --fold 3
```
`predict --adapt bn --tent-steps 2`, `python -m competition.score models/x --ood-dir D --bn-adapt`, `score suite`"""
    assert problems_in(commands_in_markdown(good), spec) == [] and check_paths(good) == []


def test_every_entry_point_has_a_parser(spec):
    assert {"train", "predict", "ensemble", "score", "folds", "submit", "board", "selftrain"} <= set(spec.parsers)
    accepts = set(spec.parsers[spec.run_sh_module]._option_string_actions) if spec.run_sh_module else spec.run_sh
    assert {"--dataset", "--parts", "--weights", "--tta-adapt", "--help"} <= accepts


def test_readme_commands_exist(spec):
    text = README.read_text()
    commands = commands_in_markdown(text)
    assert len(commands) > 30 and any(c.startswith("./run.sh") for c in commands)
    problems = problems_in(commands, spec) + check_paths(text)
    assert not problems, "README.md names what does not exist:\n" + "\n".join(problems)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_examples_exist(spec, module):
    """The examples a `--help` prints (the module docstring, description and epilog)."""
    text = help_text(spec.parsers[module])
    problems = problems_in(commands_in_markdown(text) + commands_in_block(text), spec) + check_paths(text)
    assert not problems, f"python -m competition.{module} --help names what does not exist:\n" + "\n".join(problems)


def test_package_docstring_commands_exist(spec):
    """competition/__init__.py's table of stages and their commands."""
    import competition

    text = competition.__doc__
    commands = commands_in_block(text)
    assert len(commands) >= 7
    problems = problems_in(commands, spec) + check_paths(text)
    assert not problems, "competition/__init__.py names what does not exist:\n" + "\n".join(problems)
    script_style = [c for c in commands if re.search(r"python3? competition/", c)]
    assert not script_style, f"stages run as `python -m competition.X`: {script_style}"


@pytest.mark.parametrize("module", [pytest.param(m, marks=pytest.mark.xfail(
    strict=True, reason=f"competition/{m}.py: ArgumentParser(prog='python -m competition.{m}', ...) is pending"))
    if m in USAGE_PENDING else m for m in ENTRY_POINTS])
def test_help_usage_line_names_the_module(spec, module):
    assert usage_problems(spec.parsers[module], module) == []


def test_the_usage_check_catches_a_script_name():
    parser = argparse.ArgumentParser(prog="folds.py")
    assert usage_problems(parser, "folds") == ["usage: folds.py [-h]"]
    assert usage_problems(argparse.ArgumentParser(prog="python -m competition.folds"), "folds") == []


def test_run_sh_help_names_only_its_options(spec):
    """run.sh's header (its `--help` while it parses its own options): its examples and its option
    list name only options run.sh accepts. When run.sh hands its arguments to an entry point
    (competition.pipeline), its --help is that module's, checked with the other modules."""
    text = run_sh_help(RUN_SH.read_text())
    assert "./run.sh" in text
    problems = problems_in(commands_in_block(text), spec) + check_paths(text)
    if spec.run_sh_module:
        assert not problems, "run.sh's header names what does not exist:\n" + "\n".join(problems)
        return
    # The option list: a flag at the start of a line or after a wide gap is one of run.sh's own
    # (a flag after a word, as in "(train.py --force)", is another program's).
    listed = set(re.findall(r"(?:^|\s{3})(--[A-Za-z][\w-]*)", text, re.M))
    problems += [f"{flag} is listed but run.sh does not accept it" for flag in sorted(listed - spec.run_sh)]
    assert not problems, "run.sh --help names what does not exist:\n" + "\n".join(problems)
    undocumented = spec.run_sh - listed - {"-h", "--help", "--bn-adapt"}  # --bn-adapt: the old spelling of --tta-adapt bn
    assert not undocumented, f"run.sh accepts {sorted(undocumented)} but its --help does not list them"
