"""The dependency rules of docs/architecture.md, checked by parsing every import (function-level ones too).

Each checker is a plain function of a repository root that returns what breaks a rule (empty = the rule holds):
- layer_violations: (a) the core (shuffler/ except shuffler/cli/ and shuffler/__main__.py) imports none of
  writers, readers, trainer, shuffler.cli, click; (b) writers and readers never import each other; (c) trainer
  imports neither writers nor shuffler.cli.
- import_cycles: (d) no cycle in the module graph, function-level imports included.
- outside_citations: (e) no module, README.md or docs/*.md cites a file outside the repository.
- heavy_imports_of_help: (f) `python -m shuffler --help` imports none of torch, ray, transformers, pyarrow.
The tests at the bottom run each checker on a small bad tree built in tmp_path, so each rule is shown able to fail.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

PACKAGES = ("shuffler", "writers", "readers", "trainer")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# Modules and their imports


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the four packages under root."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for f in sorted((Path(root) / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imported_names(path: Path, name: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """Every import statement anywhere in the file (module level, in functions, under `if`), as
    (line, absolute module, names taken from it). Relative imports are resolved against the module's package;
    `import a.b` gives ("a.b", ()), `from a import b, c` gives ("a", ("b", "c"))."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module, tuple(a.name for a in node.names)))
    return out


def targets(module: str, names: tuple[str, ...]) -> list[str]:
    """The dotted names one import statement reaches: the module, and module.name for each name taken from it
    (so `from shuffler import cli` reaches shuffler.cli)."""
    return [module] + [f"{module}.{n}" for n in names if n != "*"]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# ---------------------------------------------------------------------------------------------------
# (a)-(c): which package may import which


def layer_violations(root: Path) -> list[str]:
    """One line per import that breaks rules (a), (b) or (c)."""
    out = []
    for name, path in modules(root).items():
        pkg = name.split(".")[0]
        core = pkg == "shuffler" and not _within(name, "shuffler.cli") and name != "shuffler.__main__"
        if pkg == "shuffler" and not core:
            continue
        for line, module, names in imported_names(path, name):
            for t in targets(module, names):
                if core and any(_within(t, p) for p in ("writers", "readers", "trainer", "shuffler.cli", "click")):
                    why = "the core imports"
                elif pkg == "writers" and _within(t, "readers") or pkg == "readers" and _within(t, "writers"):
                    why = "writers and readers meet only through the core, but this imports"
                elif pkg == "trainer" and (_within(t, "writers") or _within(t, "shuffler.cli")):
                    why = "the trainer imports"
                else:
                    continue
                out.append(f"{path.relative_to(root)}:{line}: {why} {t}")
                break
    return out


# ---------------------------------------------------------------------------------------------------
# (d): import cycles


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the four packages it imports. `from pkg import name` is an edge to the submodule
    pkg.name when that is a module, else to pkg; `import a.b.c` is an edge to the longest known prefix of a.b.c.
    Importing a package does not count as importing its children (nor, for cycles, its parents' __init__)."""
    mods = modules(root)

    def known(dotted: str) -> str | None:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in mods:
                return ".".join(parts[:i])
        return None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for _, module, names in imported_names(path, name):
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in mods]
            if subs:
                graph[name].update(subs)
            if len(subs) < len(names) or not names:
                t = known(module)
                if t is not None:
                    graph[name].add(t)
        graph[name].discard(name)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: every strongly connected component, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def import_cycles(root: Path) -> list[list[str]]:
    """Every strongly connected component of more than one module: each is at least one import cycle."""
    return sorted(c for c in strongly_connected(module_graph(root)) if len(c) > 1)


# ---------------------------------------------------------------------------------------------------
# (e): citations of files outside the repository

URL = re.compile(r"https?://\S+")
OUTSIDE = re.compile(
    r"\.\./shared|shared/reference|shared/data|reference/[\w.-]*\.md|measure-limits\.md|infra-check\.md"
    r"|peers-[\w-]*\.md|GUIDE\.md"
)


def outside_citations(root: Path) -> list[str]:
    """One line per line of a module, README.md or docs/*.md that names a file outside the repository (URLs are
    public sources, so they are not read)."""
    root = Path(root)
    files = list(modules(root).values()) + [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    out = []
    for f in files:
        if not f.exists():
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            m = OUTSIDE.search(URL.sub("", line))
            if m:
                out.append(f"{f.relative_to(root)}:{i}: cites {m.group(0)}")
    return out


# ---------------------------------------------------------------------------------------------------
# (f): what `python -m shuffler --help` imports

HEAVY = ("torch", "ray", "transformers", "pyarrow")
HELP_WRAPPER = """
import runpy, sys
sys.argv = ["shuffler", "--help"]
code = 0
try:
    runpy.run_module("shuffler", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("\\nHELP-EXIT", code, "HEAVY=" + ",".join(heavy))
"""


def heavy_imports_of_help(root: Path) -> list[str]:
    """The heavy libraries that `python -m shuffler --help` (run in-process in a fresh interpreter with root
    first on the path) leaves in sys.modules; a failed --help is a violation too."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    p = subprocess.run([sys.executable, "-c", HELP_WRAPPER.format(heavy=HEAVY)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    last = p.stdout.strip().splitlines()[-1:] if p.stdout.strip() else []
    if p.returncode != 0 or not last or not last[0].startswith("HELP-EXIT"):
        return [f"`python -m shuffler --help` did not run: exit {p.returncode}; {p.stderr.strip()[-2000:]}"]
    _, code, heavy = last[0].split()
    out = [f"`python -m shuffler --help` imports {m}" for m in heavy.removeprefix("HEAVY=").split(",") if m]
    if code != "0":
        out.append(f"`python -m shuffler --help` exited {code}: {p.stdout[-1000:]}{p.stderr[-1000:]}")
    return out


# ---------------------------------------------------------------------------------------------------
# The rules on this repository


def test_layers():
    assert layer_violations(ROOT) == []


def test_no_import_cycles():
    cycles = import_cycles(ROOT)
    assert cycles == [], "import cycles (strongly connected components):\n" + "\n".join(
        f"  {len(c)} modules: {' '.join(c)}" for c in cycles)


def test_no_citations_outside_repository():
    assert outside_citations(ROOT) == []


def test_help_imports_nothing_heavy():
    assert heavy_imports_of_help(ROOT) == []


def test_checkers_see_every_package():
    mods = modules(ROOT)
    for pkg in PACKAGES + ("shuffler.cli", "shuffler.shuffling.run", "writers.importers", "readers.order"):
        assert pkg in mods
    graph = module_graph(ROOT)
    assert "shuffler.shuffling.run" in graph["shuffler"]  # shuffler/__init__.py imports it


def private_imports(root: Path) -> list[str]:
    """`from m import _name` where m is another module of the project: a private name used across modules."""
    out = []
    for name, path in modules(root).items():
        for line, module, names in imported_names(path, name):
            if module.split(".")[0] in PACKAGES and module != name:
                out.extend(f"{path.relative_to(root)}:{line}: imports {module}.{n}, a private name"
                           for n in names if n.startswith("_") and not n.startswith("__"))
    return out


def test_no_private_names_across_modules():
    assert private_imports(ROOT) == []


# ---------------------------------------------------------------------------------------------------
# Each rule can fail: the checkers on small bad trees


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    for pkg in PACKAGES:
        (root / pkg).mkdir(exist_ok=True)
        (root / pkg / "__init__.py").touch()
    return root


def test_core_importing_a_producer_or_the_cli_fails(tmp_path):
    root = tree(tmp_path, {
        "shuffler/io/__init__.py": "",
        "shuffler/io/a.py": "def f():\n    from writers.shard_writer import ShardWriter\n",
        "shuffler/b.py": "import click\n",
        "shuffler/c.py": "from . import cli\n",
        "shuffler/d.py": "if True:\n    import readers\n",
        "shuffler/cli/__init__.py": "import click\nimport writers\nimport readers\nimport trainer\n",
        "shuffler/__main__.py": "import writers\n",
        "writers/shard_writer.py": "",
    })
    found = layer_violations(root)
    assert sorted(x.split(":")[0] for x in found) == sorted(
        ["shuffler/io/a.py", "shuffler/b.py", "shuffler/c.py", "shuffler/d.py"]), found
    assert any("the core imports shuffler.cli" in x for x in found)


def test_writers_and_readers_importing_each_other_fails(tmp_path):
    root = tree(tmp_path, {
        "writers/w.py": "from readers import order\n",
        "readers/r.py": "def f():\n    import writers.shard_writer\n",
        "readers/ok.py": "from shuffler import Dataset\n",
    })
    assert sorted(x.split(":")[0] for x in layer_violations(root)) == ["readers/r.py", "writers/w.py"]


def test_trainer_importing_writers_or_the_cli_fails(tmp_path):
    root = tree(tmp_path, {
        "trainer/a.py": "from writers import capture\n",
        "trainer/b.py": "def f():\n    from shuffler.cli.train import train_cmd\n",
        "trainer/c.py": "from ..shuffler import cli\n",
        "trainer/ok.py": "import readers\nfrom shuffler.units import parse_size\n",
    })
    assert sorted(x.split(":")[0] for x in layer_violations(root)) == ["trainer/a.py", "trainer/b.py", "trainer/c.py"]


def test_function_level_import_cycle_fails(tmp_path):
    root = tree(tmp_path, {
        "shuffler/a.py": "from shuffler.b import x\n",
        "shuffler/b.py": "x = 1\ndef f():\n    from . import c\n",
        "shuffler/c.py": "def g():\n    import shuffler.a\n",
        "shuffler/d.py": "from shuffler import a\n",  # into the cycle, not part of it
        "shuffler/e.py": "from shuffler.f import y\n",
        "shuffler/f.py": "y = 2\ndef h():\n    from shuffler.e import z\n",
    })
    assert import_cycles(root) == [["shuffler.a", "shuffler.b", "shuffler.c"], ["shuffler.e", "shuffler.f"]]


def test_package_import_is_not_an_import_of_its_children(tmp_path):
    root = tree(tmp_path, {
        "shuffler/__init__.py": "from shuffler.io.dataset import Dataset\n",
        "shuffler/io/__init__.py": "",
        "shuffler/io/dataset.py": "from shuffler.errors import FormatError\nDataset = 1\n",
        "shuffler/errors.py": "FormatError = ValueError\n",
        "readers/__init__.py": "from shuffler import Dataset\n",
    })
    assert import_cycles(root) == []
    graph = module_graph(root)
    assert graph["readers"] == {"shuffler"}
    assert graph["shuffler.io.dataset"] == {"shuffler.errors"}


def test_citing_a_file_outside_the_repository_fails(tmp_path):
    root = tree(tmp_path, {
        "shuffler/a.py": "X = 8  # 8 MiB (measure-limits.md)\n",
        "writers/b.py": '"""See ../shared/data/README.md."""\n',
        "README.md": "Measured in shared/reference/peers-measured.md.\n",
        "docs/x.md": "ok line\nsee GUIDE.md\n",
        "docs/y.md": "see docs/format.md and https://example.org/reference/a.md\n",
    })
    found = outside_citations(root)
    assert [x.split(": cites")[0] for x in found] == ["shuffler/a.py:1", "writers/b.py:1", "README.md:1", "docs/x.md:2"], found


def test_help_importing_a_heavy_library_fails(tmp_path):
    root = tree(tmp_path, {
        "pyarrow/__init__.py": "",  # a stand-in, first on the path: importing it must be seen
        "shuffler/cli/__init__.py": "import sys\ndef main():\n    import pyarrow\n    print('usage')\n    sys.exit(0)\n",
        "shuffler/__main__.py": "from shuffler.cli import main\nmain()\n",
    })
    assert heavy_imports_of_help(root) == ["`python -m shuffler --help` imports pyarrow"]
    (root / "shuffler/cli/__init__.py").write_text("def main():\n    raise RuntimeError('broken')\n")
    assert "did not run" in heavy_imports_of_help(root)[0]


def test_importing_a_private_name_from_another_module_fails(tmp_path):
    root = tree(tmp_path, {
        "shuffler/a.py": "_hidden = 1\nshown = 2\n",
        "shuffler/b.py": "def f():\n    from shuffler.a import _hidden, shown\n",
        "shuffler/c.py": "from shuffler.a import shown\nfrom collections import _chain_rest\n",
    })
    assert private_imports(root) == ["shuffler/b.py:2: imports shuffler.a._hidden, a private name"]
