"""The packages depend downwards only: bench -> train -> gpt -> kernels; inside a package, no cycle.

Checked twice: statically, every import statement anywhere in a package's source (functions included,
so a lazy import cannot hide an upward dependency), and at run time, importing every module of a
package in a fresh interpreter in which the packages above it cannot be imported. The modules inside
each package import each other without a cycle, again counting every import statement anywhere in a
file (an import inside a function that breaks a cycle at run time still counts).
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.background import finish, stop_all

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "gpt", "train", "bench"]  # each may import only the ones before it
# The kernel modules never import the tool that inspects them: the report imports the kernels.
REPORT = "kernels.report"


def _module(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, anywhere in it, relative ones resolved."""
    base = _module(path, root).split(".")[:-1]  # the package holding the file (for __init__.py: itself)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                name = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((name, node.lineno))
            out += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_reaches_up(package):
    above = LAYERS[LAYERS.index(package) + 1:]
    bad = []
    for path in _sources(package):
        for name, line in _imports(path):
            if name.split(".")[0] in above:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            if package == "kernels" and name.startswith(REPORT) and _module(path, ROOT) != REPORT:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {REPORT}, which should import it instead")
    assert not bad, "imports against the layering bench -> train -> gpt -> kernels:\n" + "\n".join(bad)


def test_the_static_check_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: upward imports inside a function, relative or not, are found."""
    probe = tmp_path / "gpt" / "sub" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from ...train import loop\n    from .. import ops\n    import bench.run\n")
    found = [name for name, _ in _imports(probe, tmp_path)]
    assert {"train.loop", "gpt.ops", "bench.run"} <= set(found), found


def _module_names(root: Path, packages) -> dict[str, Path]:
    """Every module of the packages by its import name; a package's __init__.py by the package's name."""
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = _module(path, root)
            names[name.removesuffix(".__init__")] = path
    return names


def _import_graph(root: Path = ROOT, packages=LAYERS) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}. `from pkg import name` imports pkg
    (its __init__) and, where name is a submodule, that submodule; `import a.b` imports a.b (a package:
    its __init__). Names that are not modules of these packages (attributes, other libraries) are no edge."""
    names = _module_names(root, packages)
    graph = {}
    for name, path in names.items():
        edges = {}
        for target, line in _imports(path, root):
            if target in names and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(cycle: list[str], graph: dict[str, dict[str, int]], root: Path = ROOT) -> str:
    names = _module_names(root, {m.split(".")[0] for m in cycle})
    edges = [f"  {names[a].relative_to(root)}:{line} imports {b}" for a in cycle for b, line in graph[a].items()
             if b in cycle]
    return f"a cycle among {', '.join(cycle)}:\n" + "\n".join(edges)


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_cycle_inside_a_package(package):
    graph = _import_graph()
    cycles = [c for c in _cycles(graph) if c[0].split(".")[0] == package]
    assert not cycles, "import cycles (every import statement counts, lazy ones too):\n" + \
        "\n".join(_describe(c, graph) for c in cycles)


def test_the_cycle_check_sees_lazy_imports_and_package_inits(tmp_path):
    """The checker itself: a cycle closed by an import inside a function, one through a package's __init__
    (a submodule doing `from . import sibling` where __init__ imports that submodule) and one through
    `from pkg.sub import name` of a submodule are all found; imports that only go down are not cycles."""
    files = {
        "gpt/__init__.py": "from .model import GPT\n",
        "gpt/model.py": "from . import ops\nclass GPT: pass\n",                 # gpt -> gpt.model -> gpt
        "gpt/ops.py": "import math\n",
        "gpt/gen/__init__.py": "from .api import run\n",
        "gpt/gen/api.py": "from .low import step\ndef run(): pass\n",
        "gpt/gen/low.py": "def step():\n    from gpt.gen.api import run\n",      # lazy: low -> api -> low
        "gpt/fine.py": "from .gen import run\nfrom gpt import ops\nfrom .ops import math\n",
        "kernels/__init__.py": "", "kernels/a.py": "from kernels import b\n",
        "kernels/b.py": "import kernels.c\n", "kernels/c.py": "def f():\n    from . import a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = _import_graph(tmp_path, ["gpt", "kernels"])
    assert graph["gpt.model"] == {"gpt": 1, "gpt.ops": 1} and graph["gpt.gen.low"] == {"gpt.gen.api": 2}
    assert sorted(_cycles(graph)) == [["gpt", "gpt.model"], ["gpt.gen.api", "gpt.gen.low"],
                                      ["kernels.a", "kernels.b", "kernels.c"]]


# First on sys.meta_path and raising, unlike tests/test_optional_packages.py's blocker (which only hides
# packages from the sys.path finder): this project is installed editable, and its packages are found by
# the editable install's own finder, which that blocker does not see.
BLOCKER = """
import importlib, importlib.abc, pkgutil, sys
blocked = set(sys.argv[2:])
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"layering: {name} must not be imported here")
sys.meta_path.insert(0, Block())
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, sys.argv[1] + "."):
    importlib.import_module(info.name)
print("ok", sys.argv[1])
"""


ANYWHERE = "import importlib, json; print(json.dumps({n: importlib.import_module(n).__file__ for n in %r}))" % LAYERS


@pytest.fixture(scope="module")
def fresh_interpreters(tmp_path_factory):
    """The run-time checks' interpreters, started together (each is mostly `import torch` on one core):
    package -> its process with the layers above it blocked, and "anywhere" -> the one run outside the
    checkout. Each test waits for its own."""
    procs = {package: subprocess.Popen([sys.executable, "-c", BLOCKER, package, *LAYERS[LAYERS.index(package) + 1:]],
                                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for package in LAYERS[:-1]}
    procs["anywhere"] = subprocess.Popen([sys.executable, "-c", ANYWHERE], cwd=tmp_path_factory.mktemp("elsewhere"),
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield procs
    stop_all(procs.values())


@pytest.mark.parametrize("package", LAYERS[:-1])
def test_each_package_imports_with_the_layers_above_it_blocked(package, fresh_interpreters):
    proc = finish(fresh_interpreters[package])
    assert proc.returncode == 0 and proc.stdout.strip() == f"ok {package}", proc.stderr[-3000:]


def test_the_packages_are_this_projects_from_any_directory(fresh_interpreters):
    """An installed distribution with one of the same import names (Hugging Face's `kernels`, which
    transformers 5.25+ requires) would shadow ours outside the checkout: run from elsewhere, every
    top-level package must still resolve here."""
    out = finish(fresh_interpreters["anywhere"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout)
    assert all(Path(f).resolve().is_relative_to(ROOT) for f in found.values()), found
