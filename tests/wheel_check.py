"""``make wheel-check``: install a wheel into a fresh virtual environment and use it from
there, so that a wheel missing a file fails.

The environment has no editable install and no checkout on its path: it is created with
``python -m venv --without-pip`` and gets its dependencies (torch, timm…) from the
site-packages folder of the interpreter that runs this script, added as a plain path by a
``.pth`` line. That folder's own ``.pth`` files are not processed, so the editable
install's finder, which would fill in any module the wheel lacks from the checkout, is
never installed. The wheel is installed with pip offline (``--no-index --no-deps``);
``wheel_smoke.py`` then runs in isolated mode (``-I``: no ``PYTHONPATH``, no user site, no
script folder) from outside the checkout, and the console scripts run from the
environment's ``bin``.

    python tests/wheel_check.py DIST.whl              # the wheel must pass
    python tests/wheel_check.py DIST.whl --broken     # and a copy without a module must fail

Exit status 0 when every expectation holds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = Path(__file__).resolve().parent / "wheel_smoke.py"
DROPPED = "dtl_kernels/predict.py"  # what the broken copy lacks (imported by dtl-predict only)


def source_modules(root: Path = ROOT) -> list[str]:
    """Every module of the package in the source tree (what the wheel must carry)."""
    package = root / "dtl_kernels"
    return sorted(
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for p in package.rglob("*.py")
        if "__pycache__" not in p.parts
    )


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def check(wheel: Path, deps: str, work: Path) -> subprocess.CompletedProcess:
    """Fresh venv in ``work``, the wheel installed, the smoke test and console scripts run
    (stdout + stderr of the first failure, or of the last step)."""
    venv = work / "venv"
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   env=env)  # fmt: skip
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout.strip())  # fmt: skip
    (site / "_dtl_dependencies.pth").write_text(deps + "\n")  # a path, not a site dir
    steps = [
        [str(python), "-I", "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
         "--ignore-installed", "--disable-pip-version-check", str(wheel)],
        [str(python), "-I", str(SMOKE), str(site), "--modules", ",".join(source_modules())],
        [str(venv / "bin" / "dtl-train"), "--version"],
        [str(venv / "bin" / "dtl-predict"), "--version"],
    ]  # fmt: skip
    for cmd in steps:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return proc
    return proc


def without(wheel: Path, member: str, out: Path) -> Path:
    """A copy of ``wheel`` that lacks ``member``."""
    broken = out / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(broken, "w") as dst:
        names = src.namelist()
        if member not in names:
            raise SystemExit(f"{wheel} has no {member} to leave out")
        for info in src.infolist():
            if info.filename != member:
                dst.writestr(info, src.read(info.filename))
    return broken


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path)
    p.add_argument(
        "--deps",
        default=sysconfig.get_paths()["purelib"],
        help="site-packages folder with the dependencies (default: this python's)",
    )
    p.add_argument("--broken", action="store_true",
                   help=f"also check that a copy without {DROPPED} fails")  # fmt: skip
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wheel-check-") as tmp:
        good = check(args.wheel.resolve(), args.deps, Path(tmp) / "good")
        if good.returncode != 0:
            print(f"wheel check FAILED for {args.wheel}:\n{good.stdout}{good.stderr}")
            return 1
        print(good.stdout.strip() or f"wheel check: ok ({args.wheel})")
        if args.broken:
            (Path(tmp) / "broken").mkdir()
            copy = without(args.wheel.resolve(), DROPPED, Path(tmp) / "broken")
            bad = check(copy, args.deps, Path(tmp) / "broken")
            missing = DROPPED.removesuffix(".py").replace("/", ".")
            if bad.returncode == 0 or missing not in bad.stdout + bad.stderr:
                print(f"wheel check: a wheel without {DROPPED} was not refused:\n"
                      f"{bad.stdout}{bad.stderr}")  # fmt: skip
                return 1
            print(f"wheel check: a wheel without {DROPPED} fails, as it must")
    return 0


if __name__ == "__main__":
    sys.exit(main())
