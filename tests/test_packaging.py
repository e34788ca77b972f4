"""The wheel: three modules and a `buquet` command, no dependencies, and it
works in a fresh virtual environment.  One slow test (about 10 s: a build
with an isolated setuptools, a venv, an install)."""

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a build must not see: environments, caches and earlier build output.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".benchmarks", ".buquet", "*.pyc")


def _run(argv, **options):
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **options)
    assert done.returncode == 0, "%s\n%s\n%s" % (" ".join(map(str, argv)), done.stdout, done.stderr)
    return done


def test_wheel_holds_three_modules_and_a_command_and_installs_cleanly(tmp_path):
    # Build from a copy of the tree (tests and examples included) so that the
    # checkout gets no build/ directory.
    source = tmp_path / "src"
    shutil.copytree(str(ROOT), str(source), ignore=NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path / "dist")])
    (wheel,) = (tmp_path / "dist").glob("buquet-*.whl")
    print("\nwheel: %s, %d bytes" % (wheel.name, wheel.stat().st_size))

    with zipfile.ZipFile(str(wheel)) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert sorted(n for n in names if not n.startswith(dist_info + "/")) == ["buquet.py", "cron.py", "sigv4.py"]
        metadata = Parser().parsestr(z.read(dist_info + "/METADATA").decode("utf-8"))
        entry_points = z.read(dist_info + "/entry_points.txt").decode("utf-8")
    assert metadata["Name"] == "buquet" and metadata["Requires-Python"] == ">=3.9"
    # Only the test extra has requirements; installing buquet pulls in nothing.
    assert [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r] == []
    assert "[console_scripts]\nbuquet = buquet:main" in entry_points
    assert wheel.stat().st_size < 200_000

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)])
    # From a directory without the sources, so only the installed copies can be imported.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    shown = _run([bin_dir / "buquet", "--help"], cwd=str(elsewhere), env=env)
    assert shown.stdout.startswith("usage: buquet ")
    for command in ("submit", "worker", "doctor", "schedule"):
        assert command in shown.stdout
    imported = _run([bin_dir / "python", "-c", "import buquet, sigv4, cron; print(buquet.__file__)"],
                    cwd=str(elsewhere), env=env)
    installed = Path(imported.stdout.strip())
    assert installed.parent.name == "site-packages" and str(installed).startswith(str(venv))
    frozen = _run([bin_dir / "python", "-m", "pip", "list", "--format=freeze"], cwd=str(elsewhere), env=env)
    assert {line.split("==")[0] for line in frozen.stdout.split()} <= {"buquet", "pip", "setuptools"}
