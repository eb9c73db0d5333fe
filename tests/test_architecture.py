"""The shape of the code: imports flow one way, notebooks stay thin, the library never shows.

Imports are read with ``ast`` (nothing is imported); ``if TYPE_CHECKING:`` blocks are skipped,
since annotations may name any module.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xattn_utils"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# every module by its dotted name inside the package ("maps.spes"); a family's __init__ is the
# family ("report"); the package's own __init__ is the public surface, checked apart
MODULES = {_dotted(p): p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"}
FAMILIES = ("model", "maps", "analysis", "reference", "viz", "report")

# The data flow (style.md): a module may import, at module level, only modules to its left; the
# families follow one another in this order, so imports also go one way between families.
ORDER = [
    "audio", "store", "data", "hf_datasets",
    "model", "model.convert", "model.families", "model.loading", "model.speech2text",
    "model.decode",
    "maps", "maps.explanation", "maps.attention", "maps.views", "maps.prepare", "maps.gradients",
    "maps.perturbation", "maps.masks", "maps.estimators", "maps.forwards", "maps.spes",
    "maps.saliency",
    "maps.corpus", "maps.distributed",
    "captum",
    "analysis", "analysis.compare", "analysis.stats", "analysis.convergence", "analysis.occlusion",
    "analysis.faithfulness", "analysis.captum_metrics",
    "analysis.timing", "analysis.timestamps", "analysis.boundaries", "analysis.timestamp_methods",
    "analysis.guide", "analysis.heads", "analysis.alignment",
    "analysis.calibration", "analysis.aligner", "analysis.timestamp_formats", "analysis.mixing",
    "analysis.context", "analysis.tables", "analysis.findings",
    "reference", "reference.whisper",
    "viz", "viz.plots", "viz.charts", "viz.widgets",
    "report.study", "report", "report.index", "report.runner",
    "cli",
]  # fmt: skip
# model code: what loads or runs a model (maps.views and maps.explanation are plain data)
MODEL_CODE = {m for m in MODULES if m.startswith(("model", "maps"))} | {"report.study"}
MODEL_CODE -= {"maps", "maps.views", "maps.explanation"}
# never import model code, not even lazily
NO_MODEL_CODE = (
    "viz.plots", "viz.charts", "analysis.compare", "analysis.stats", "store", "analysis.tables",
    "analysis.findings", "analysis.boundaries", "analysis.guide", "analysis.heads",
)  # fmt: skip
# Imports inside a function may reach modules to the right only where declared here, with why.
LAZY_UPSTREAM = {
    ("data", "hf_datasets"): "load_corpus reads save_to_disk folders and audiofolder:PATH",
    ("model.loading", "model.speech2text"): "load_model hands Speech2Text checkpoints over",
}
PARAMETERS = {
    "model", "data", "n_utterances", "method", "n_masks", "task", "language", "device", "seed",
    "out", "use_reference_text", "store",
}  # fmt: skip


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _walk(nodes, *, top: bool):
    """Yield (node, at_module_level) for every node, skipping TYPE_CHECKING blocks."""
    for node in nodes:
        if _is_type_checking(node):
            continue
        yield node, top
        nested = top and isinstance(node, ast.If | ast.Try | ast.With)
        yield from _walk(ast.iter_child_nodes(node), top=nested)


def _ours(parts: list[str]) -> str | None:
    """The package module named by ``parts`` (its longest known prefix), or None."""
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in MODULES:
            return ".".join(parts[:k])
    return None


def imports(path: Path) -> list[tuple[str, bool, bool]]:
    """(imported module, is a package module, at module level) for each import in ``path``;
    package modules by their dotted names (relative imports resolved)."""
    here = list(path.relative_to(PACKAGE).parts[:-1])  # the package holding ``path``
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node, top in _walk(tree.body, top=True):
        if isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".") if node.module else []
            if node.level:
                base = here[: len(here) - node.level + 1] + module
            elif module[0] == "xattn_utils":
                base = module[1:]
            else:
                found.append((module[0], False, top))
                continue
            for alias in node.names:
                name = _ours([*base, alias.name]) or _ours(base)
                found.append((name or "xattn_utils", True, top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "xattn_utils" and len(parts) > 1:
                    found.append((_ours(parts[1:]) or parts[1], True, top))
                else:
                    found.append((parts[0], False, top))
    return found


def test_every_module_has_its_place_in_the_order():
    assert sorted(MODULES) == sorted(ORDER), (
        f"not in ORDER: {sorted(set(MODULES) - set(ORDER))}; "
        f"gone: {sorted(set(ORDER) - set(MODULES))}"
    )


def test_imports_inside_functions_reach_later_modules_only_where_declared():
    rank = {m: i for i, m in enumerate(ORDER)}
    upstream = {
        (m, n)
        for m in MODULES
        for n in package_imports(m, module_level_only=False)
        if rank[n] > rank[m]
    }
    assert upstream <= set(LAZY_UPSTREAM), f"undeclared: {sorted(upstream - set(LAZY_UPSTREAM))}"
    assert set(LAZY_UPSTREAM) <= upstream, f"no longer needed: {set(LAZY_UPSTREAM) - upstream}"


def test_families_are_contiguous_in_the_order():
    for family in FAMILIES:
        at = [i for i, m in enumerate(ORDER) if m.split(".")[0] == family]
        assert at == list(range(at[0], at[-1] + 1)), f"{family} is split in ORDER"


def package_imports(name: str, *, module_level_only: bool) -> set[str]:
    return {
        n
        for n, ours, top in imports(MODULES[name])
        if ours and n in MODULES and (top or not module_level_only)
    }


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_level_imports_follow_the_data_flow(name):
    rank = {m: i for i, m in enumerate(ORDER)}
    later = {
        m for m in package_imports(name, module_level_only=True)
        if m != name and rank.get(m, -1) >= rank[name]
    }  # fmt: skip
    assert not later, f"{name} imports {sorted(later)}, which come after it in {ORDER}"


def test_module_level_import_graph_has_no_cycle():
    graph = {m: package_imports(m, module_level_only=True) - {m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*path, m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in graph[m]:
            visit(n, [*path, m])
        state[m] = 2

    for m in graph:
        visit(m, [])


@pytest.mark.parametrize("name", NO_MODEL_CODE)
def test_plots_compare_store_never_import_model_code(name):
    found = imports(MODULES[name])
    ours = {n for n, is_ours, _ in found if is_ours}
    assert not ours & MODEL_CODE, f"{name} imports model code {sorted(ours & MODEL_CODE)}"
    third_party = {n for n, is_ours, _ in found if not is_ours}
    assert "transformers" not in third_party, f"{name} imports transformers"


def test_audio_imports_nothing_from_the_package():
    assert not package_imports("audio", module_level_only=False)


def test_library_never_calls_plt_show():
    for path in [*MODULES.values(), PACKAGE / "__init__.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                assert not (
                    node.func.attr == "show" and isinstance(owner, ast.Name) and owner.id == "plt"
                ), f"{path.name}:{node.lineno} calls plt.show(); return the Axes instead"


def test_public_surface_is_sorted():
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    names = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__"
    )
    assert names == sorted(names)


# -- notebooks ----------------------------------------------------------------------------------


def _code_cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    # IPython magics and shell escapes are not Python
    return "\n".join("" if line.lstrip()[:1] in "%!" and line.strip() else line
                     for line in src.splitlines())  # fmt: skip


def test_there_are_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06", "07", "90"]


def test_every_notebook_joins_the_report():
    from xattn_utils.report import NOTEBOOKS as IN_REPORT

    assert sorted(IN_REPORT) == [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_define_no_functions_or_classes(path):
    for i, cell in enumerate(_code_cells(path)):
        for node in ast.walk(ast.parse(_source(cell))):
            assert not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef), (
                f"{path.name}, code cell {i}: `{node.name}` belongs in the library"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_have_one_flat_parameters_cell(path):
    cells = [c for c in _code_cells(path) if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters'"
    values = {}
    for node in ast.parse(_source(cells[0])).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)
        values[node.targets[0].id] = ast.literal_eval(node.value)  # flat, literal values
    json.dumps(values)  # JSON-able
    assert PARAMETERS <= set(values), f"{path.name} lacks {sorted(PARAMETERS - set(values))}"
    ci = ROOT / "notebooks" / "params" / f"{path.stem}.ci.yaml"
    ci_values = yaml.safe_load(ci.read_text(encoding="utf-8"))
    assert set(ci_values) <= set(values), f"{ci.name} sets unknown {set(ci_values) - set(values)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    for cell in _code_cells(path):
        assert not cell["outputs"] and cell["execution_count"] is None, (
            f"{path.name} holds outputs: clear them (nbstripout) before committing"
        )
