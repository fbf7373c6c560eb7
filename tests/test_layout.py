"""The house rules, checked on the source: floors, no import circle, no hidden circle-breaking
imports, modules a reader can take in one sitting, and start-up without the heavy libraries.

Oracles: Python's own parser (``ast``) for the import graph, and ``sys.modules`` of a fresh
interpreter for what a command really imported.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
MAX_LINES = 600

# floors, bottom up: an import may point to its own floor or below, never up
FLOORS = [
    {"pipeline", "pipeline.files", "pipeline.seeds", "pipeline.errors", "pipeline.urls"},
    {
        "pipeline.config",
        "pipeline.data",
        "pipeline.model",
        "pipeline.optim",
        "pipeline.backprop",
        "pipeline.train",
        "pipeline.evaluate",
        "pipeline.bounds",
        "pipeline.gradcheck",
        "pipeline.stacked",
        "pipeline.device",
        "pipeline.threads",
    },
    {"pipeline.storage", "pipeline.journal", "pipeline.tracking", "pipeline.signals", "pipeline.compare"},
    {"pipeline.report"},
    {"pipeline.study"},
    {"pipeline.ops", "pipeline.bench"},
    {"pipeline.cli", "pipeline.__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(name: str) -> int:
    for level, names in enumerate(FLOORS):
        if name in names or any(name.startswith(f"{n}.") for n in names if n != "pipeline"):
            return level
    raise AssertionError(f"{name} is on no floor: add it to FLOORS in {__file__}")


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str], ours: bool = True) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function?) for every import in the file (``ours``: of
    pipeline modules only)."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in known else child.module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return [(n, line, inner) for n, line, inner in found if not ours or n.split(".")[0] == "pipeline"]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {target for target, _, _ in imports(path, known)} - {name} for name, path in mods.items()}


def test_every_import_points_down_or_along_its_floor():
    mods = modules()
    up = []
    for name, path in mods.items():
        for target, line, _ in imports(path, set(mods)):
            if floor(target) > floor(name):
                up.append(f"{path.relative_to(ROOT)}:{line}: {name} (floor {floor(name)}) imports {target}")
    assert up == []


def test_no_import_circle():
    edges = graph()
    circles = []
    state: dict[str, int] = {}

    def walk(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node, [node])
    assert circles == []


def test_imports_inside_functions_are_only_marked_start_up_laziness():
    mods = modules()
    hidden = []
    for path in mods.values():
        lines = path.read_text().splitlines()
        for _, line, inner in imports(path, set(mods), ours=False):
            if inner and "lazy" not in lines[line - 1]:
                hidden.append(f"{path.relative_to(ROOT)}:{line}: {lines[line - 1].strip()}")
    assert hidden == []


def test_no_html_is_built_in_python():
    """Pages come from the Jinja2 templates (autoescaped): no tag in a Python string literal."""
    found = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr) and any(
                isinstance(v, ast.Constant) and "<" in str(v.value) and ">" in str(v.value)
                for v in node.values
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_modules_stay_readable_in_one_sitting():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules().values()}
    assert {k: v for k, v in sizes.items() if v >= MAX_LINES} == {}


@pytest.mark.parametrize("argv", [["--help"], ["check", "studies/demo.toml"], ["schedule", "--list"]])
def test_light_commands_start_without_torch_mlflow_or_optuna(argv, tmp_path):
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as exc:\n    rc = exc.code\n"
        "heavy = sorted(m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'RC', rc, file=sys.stderr)\n"
    )
    crontab = tmp_path / "crontab"
    crontab.write_text("#!/bin/sh\necho 'no crontab for test' >&2\nexit 1\n")
    crontab.chmod(0o755)
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PIPELINE_CRONTAB": str(crontab), "PYTHONPATH": str(ROOT)},
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "HEAVY [] RC 0", proc.stderr


@pytest.mark.parametrize(
    ("argv", "rc"), [(["check", "studies/demo.toml"], 0), (["check", "no-such.toml"], 2)]
)
def test_the_fast_exit_keeps_the_exit_code_the_output_and_the_exit_handlers(argv, rc, tmp_path):
    """``pipeline`` ends with ``os._exit`` after running the exit handlers: the code is main's, a
    piped stdout arrives whole and a handler registered during the command still runs."""
    marker = tmp_path / "handler-ran"
    code = (
        "import atexit, sys\nfrom pipeline.cli import entry\n"
        "marker = sys.argv[1]\natexit.register(lambda: open(marker, 'w').write('ran'))\n"
        "sys.argv = ['pipeline', *sys.argv[2:]]\nentry()\nprint('not reached')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(marker), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == rc, proc.stderr
    assert marker.read_text() == "ran" and "not reached" not in proc.stdout
    if rc == 0:
        assert json.loads(proc.stdout)["name"] == "demo"  # the whole JSON, flushed before the exit
    else:
        assert proc.stderr.startswith("error: ") and "no-such.toml" in proc.stderr
