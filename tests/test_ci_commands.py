""".ci/run runs what the docs say: the README's test command, and slow tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI = (ROOT / ".ci" / "run").read_text()


def test_ci_runs_the_readmes_test_command():
    """README.md's second command (the test suite) is the command .ci/run's test step runs (CI may add
    ``-p no:cacheprovider``), and docs/index.md shows the same command."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S)
    assert block, "README.md has no ```bash block"
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) >= 2 and "pytest" in commands[1], commands
    test_command = commands[1]
    ci = [line.strip() for line in CI.splitlines()
          if line.strip().startswith("python -m pytest") and '-m "not slow"' in line]
    assert [c.replace(" -p no:cacheprovider", "") for c in ci] == [test_command], (ci, test_command)
    assert test_command in (ROOT / "docs" / "index.md").read_text()


def _ci_test_ids() -> list[str]:
    """The ``tests/...`` paths and node ids that .ci/run's pytest commands name (line continuations joined)."""
    text = CI.replace("\\\n", " ")
    ids = []
    for line in text.splitlines():
        if line.strip().startswith("python -m pytest"):
            ids += [w for w in line.split() if w.startswith("tests/")]
    return ids


def test_every_test_ci_names_exists_and_is_marked_slow():
    ids = _ci_test_ids()
    assert ids, ".ci/run names no test"
    for node in ids:
        path, _, name = node.partition("::")
        assert (ROOT / path).is_file(), f".ci/run names {path}, which does not exist"
        if not name:
            continue
        tree = ast.parse((ROOT / path).read_text())
        funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        assert name in funcs, f".ci/run names {node}, but {path} has no function {name}"
        marks = [ast.unparse(d) for d in funcs[name].decorator_list]
        marks += [ast.unparse(a.value) for a in tree.body if isinstance(a, ast.Assign)  # module-wide marks
                  and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in a.targets)]
        assert "pytest.mark.slow" in marks, f"{node} is run by .ci/run's slow step but is not marked slow"
