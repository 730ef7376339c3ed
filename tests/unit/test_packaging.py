"""The package layout does not shadow the standard library, and the CLI starts."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_operator_is_the_standard_library():
    # Run in a fresh interpreter from the repository root, where a stray
    # top-level `operator` package would win over the stdlib module.
    code = "import operator, json; print(json.dumps([operator.__file__, hasattr(operator, 'itemgetter')]))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    path, has_itemgetter = __import__("json").loads(result.stdout)
    assert has_itemgetter
    assert Path(path).parent == Path(sysconfig.get_paths()["stdlib"])


def test_install_adds_no_top_level_operator_or_trainer():
    """The install exposes the project only under `kubetune`: nothing named
    `operator` or `trainer` lands in site-packages, and the editable-install
    finder maps only `kubetune...` names to folders."""
    import site

    for directory in site.getsitepackages():
        for name in ("operator", "trainer"):
            assert not (Path(directory) / name).exists() and not (Path(directory) / f"{name}.py").exists()
    finders = [m for n, m in sys.modules.items() if n.startswith("__editable___kubetune")]
    for finder in finders:
        assert all(name == "kubetune" or name.startswith("kubetune.") for name in finder.MAPPING), finder.MAPPING


def test_project_operator_is_only_reachable_inside_kubetune():
    import kubetune.operator

    assert Path(kubetune.operator.__file__).parent == REPO / "operator"
    import operator

    assert not hasattr(operator, "__path__"), "plain `operator` resolved to a package, not the stdlib module"


def test_kubetune_help_works():
    # The console script installed beside this interpreter, as users run it.
    script = Path(sys.executable).with_name("kubetune")
    assert script.is_file(), f"{script} missing: is the project installed (pip install -e .)?"
    result = subprocess.run([str(script), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Usage: kubetune" in result.stdout
    assert "dev" in result.stdout.split("Commands", 1)[1]
