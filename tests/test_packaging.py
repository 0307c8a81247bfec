"""The distribution: a wheel built from the checkout ships every data file the code reads and the license,
and setuptools has nothing to warn of (its deprecations become build failures on a date it names)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source checkout")
def test_the_wheel_ships_the_data_files_and_the_license_without_warnings(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    for warning in ("Warning", "deprecated", "would be ignored"):
        assert warning not in built.stdout + built.stderr, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("noprop_bench-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    data = [path.relative_to(ROOT).as_posix() for pattern in ("noprop_bench/**/templates/**/*", "noprop_bench/**/*.csv")
            for path in ROOT.glob(pattern) if path.is_file() and "__pycache__" not in path.parts]
    assert len(data) >= 8  # the report's HTML template and paper numbers, new-plugin's templates
    assert sorted(set(data) - shipped) == []
    assert any(name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE")
               for name in shipped)
