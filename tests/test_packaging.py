"""What a newcomer meets first: the distribution's name and its install hints, what `make demo` installs, and
the README's flux-nano snippet run outside the repository."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_distribution_has_its_own_name_and_every_install_hint_uses_it():
    """"diffsynth" on PyPI is DiffSynth-Studio: a hint naming it would install the other project."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "diffsynth-flux" and project["scripts"]["diffsynth"] == "diffsynth.cli:main"
    files = [*ROOT.glob("diffsynth/**/*.py"), *ROOT.glob("examples/**/*.py"), ROOT / "README.md"]
    hints = [(f.name, m) for f in files for m in re.findall(r"pip install '([\w-]+)\[(\w+)\]'", f.read_text())]
    assert len(hints) >= 5
    for name, (dist, extra) in hints:
        assert dist == project["name"] and extra in project["optional-dependencies"], (name, dist, extra)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_only_what_the_demo_needs(tmp_path):
    def planned(target: str) -> str:  # `make -n`: the commands, none run (a fresh, absent venv)
        return subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    demo, test = planned("demo"), planned("test")
    assert "pip install -q -e .\n" in demo and "[test]" not in demo and "diffsynth demo" in demo
    assert '-e ".[test]"' in test and "pytest" in test


def test_readme_nano_snippet_runs_outside_the_repository(tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "SHIPPED" in block)
    script = snippet + "assert image.size == (64, 64)\nprint('ok')\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
