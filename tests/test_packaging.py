"""The distribution: a wheel built from the checkout ships every data file the code reads and the license,
and setuptools has nothing to warn of (its deprecations become build failures on a date it names)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"


_BUILT_OR_CACHED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".tox", ".benchmarks",
                                          ".offline-kit", ".pytest_cache", "results")


def _not_sources(folder, names):
    """What the copy leaves out: builds, caches, and virtual environments (the README's ``.venv`` sits in the
    checkout, and is gigabytes), whatever they are called."""
    environments = {name for name in names if (Path(folder) / name / "pyvenv.cfg").is_file()}
    return set(_BUILT_OR_CACHED(folder, names)) | environments


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source checkout")
def test_the_wheel_ships_the_data_files_and_the_license_without_warnings(tmp_path):
    pytest.importorskip("setuptools")
    # a copy without earlier builds: setuptools would reuse files an earlier build left in build/
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_not_sources)
    built = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / "wheel")], cwd=source,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    for warning in ("Warning", "deprecated", "would be ignored"):  # the backend's own words, whatever pip says
        assert warning not in built.stderr, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("noprop_bench-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    data = [path.relative_to(ROOT).as_posix() for pattern in ("noprop_bench/**/templates/**/*", "noprop_bench/**/*.csv")
            for path in ROOT.glob(pattern) if path.is_file() and "__pycache__" not in path.parts]
    assert len(data) >= 8  # the report's HTML template and paper numbers, new-plugin's templates
    assert sorted(set(data) - shipped) == []
    assert any(name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE")
               for name in shipped)


def test_the_checkout_copy_leaves_out_virtual_environments(tmp_path):
    (tmp_path / "venv-any-name").mkdir()
    (tmp_path / "venv-any-name" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (tmp_path / "noprop_bench").mkdir()
    assert _not_sources(str(tmp_path), ["venv-any-name", "noprop_bench", ".pytest_cache"]) == {
        "venv-any-name", ".pytest_cache"}


@pytest.mark.skipif(not (ROOT / ".ci" / "run").exists(), reason="needs the source checkout")
def test_ci_and_tox_run_the_tests_as_the_readme_says():
    """CI and tox spread the tests over the cores exactly as the README's test command does."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    flags = re.search(r'pip install -e "\.\[test\]" && \.venv/bin/pytest( [^\n`]*)?\n', readme).group(1)
    assert flags == " -n auto"
    assert '"$venv/bin/pytest" -n auto\n' in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "commands = pytest -q -n auto {posargs}" in (ROOT / "tox.ini").read_text(encoding="utf-8")
