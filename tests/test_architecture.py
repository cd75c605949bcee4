"""The dependency direction of docs/architecture.md, read off the code (every import, at any depth of a module).

runtime imports nothing of npp but its errors; models and pipeline import no stage; a stage (tokenize, train, eval)
imports no other stage and not the app;
only the app (and `python -m npp`) imports several stages.
"""

import ast
from pathlib import Path

import npp

PACKAGE = Path(npp.__file__).parent
STAGES = {"tokenize", "train", "eval"}


def _imports(path: Path) -> set[str]:
    """The npp subpackages a module imports (`npp.X...` -> X; relative imports resolve within its package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the module's own package
                names = [f"npp.{path.parent.name}"]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "npp" and len(parts) > 1:
                found.add(parts[1])
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        graph.setdefault(owner, set()).update(_imports(path) - {owner})
    return graph


def test_stages_import_only_models_pipeline_runtime_and_errors():
    graph = _graph()
    for stage in STAGES:
        assert graph[stage] <= {"models", "pipeline", "runtime", "errors"}, (stage, graph[stage])


def test_models_and_pipeline_import_no_stage_and_only_the_app_imports_stages():
    graph = _graph()
    assert graph["models"] <= {"errors"}, graph["models"]
    assert graph["runtime"] <= {"errors"}, graph["runtime"]  # services that know nothing of npp's data
    assert graph["pipeline"] <= {"errors", "models", "runtime"}, graph["pipeline"]
    importers_of_app = {owner for owner, deps in graph.items() if "app" in deps}
    assert importers_of_app <= {"__main__"}, importers_of_app
    several = {owner for owner, deps in graph.items() if len(deps & STAGES) > 1}
    assert several == {"app"}, several


def test_no_module_names_the_old_cli_path():
    for path in PACKAGE.rglob("*.py"):
        assert "npp.cli" not in path.read_text(), path


def test_the_trainer_keeps_to_training():
    """Decisions live in components (plan, cadence, data feed, eval points, run record): the loop stays short."""
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[1] / "npp" / "train" / "trainer.py").read_text().count("\n")
    assert lines <= 250, lines


def test_environment_knobs_are_read_in_one_place():
    """npp.runtime.environment reads every NPP_* variable (one default each); no other module reads one."""
    import re

    from npp.runtime.environment import KNOBS

    for path in PACKAGE.rglob("*.py"):
        if path.name == "environment.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "environ" in line or "getenv" in line:
                assert "NPP_" not in line, f"{path}:{number} reads a knob (ask npp.runtime.environment): {line}"
    named = {n for p in PACKAGE.rglob("*.py") for n in re.findall(r"\bNPP_[A-Z_]+\b", p.read_text())}
    assert named - {"NPP_HF", "NPP_TEST_"} <= set(KNOBS), named - set(KNOBS)  # a URL constant; the tests' own


def test_the_longest_files_listed_for_the_test_order_exist():
    """tests/conftest.py's LONGEST_FILES orders the suite's files for the xdist workers: a file renamed or removed
    there would drop out of the order unseen."""
    from tests.conftest import LONGEST_FILES

    missing = [path for path in LONGEST_FILES if not (Path(__file__).parent.parent / path).is_file()]
    assert not missing, missing
