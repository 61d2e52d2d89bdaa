"""Installing: a machine without a C++ toolchain still installs the package, with the Triton and PyTorch backends;
the sdist carries every kernel file."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy_project(destination: Path, names=("setup.py", "pyproject.toml", "README.md", "csrc", "fused_xent")):
    """What a build needs, without the extension built in place."""
    for name in names:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
        else:
            shutil.copy(source, destination / name)


def test_install_without_a_compiler_falls_back(tmp_path):
    _copy_project(tmp_path)
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false", FUSED_XENT_CUDA="0", PYTHONPATH=str(tmp_path))
    env.pop("FUSED_XENT_REQUIRE_EXTENSION", None)
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "installing without them" in build.stdout
    report = subprocess.run([sys.executable, "-m", "fused_xent"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, check=True).stdout
    assert "was not built" in report
    assert "available backends     torch" in report

    env["FUSED_XENT_REQUIRE_EXTENSION"] = "1"
    strict = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert strict.returncode != 0


def test_the_sdist_carries_every_kernel_file(tmp_path):
    """A wheel built from the sdist (python -m build, pip install of the tarball) compiles the same kernels: every
    file under csrc/ is in it, the headers and, in an sdist made without CUDA, the CUDA sources too."""
    _copy_project(tmp_path)
    env = dict(os.environ, FUSED_XENT_CUDA="0")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", "dist"], cwd=tmp_path, env=env,
                   capture_output=True, text=True, check=True)
    (tarball,) = (tmp_path / "dist").glob("fused_xent-*.tar.gz")
    with tarfile.open(tarball) as archive:
        packed = {Path(*Path(name).parts[1:]) for name in archive.getnames()}
    kernel_files = {path.relative_to(ROOT) for path in (ROOT / "csrc").rglob("*") if path.is_file()}
    assert any(path.suffix == ".cuh" for path in kernel_files)
    assert kernel_files <= packed, sorted(kernel_files - packed)
