"""``make wheel-check`` (issue 20, item 9): the wheel is installed into a fresh virtual
environment with no editable install and no checkout on its path, so a wheel missing a
module fails. The wheel here is assembled from this checkout's built files (the real
``make wheel-check`` builds one with ``pip wheel``): complete, it passes; without a
module, it fails naming it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from wheel_check import DROPPED, ROOT, check, source_modules, without

from dtl_kernels import __version__

VARIANTS = ("_C_cpu", "_C_cpu_avx2", "_C_cpu_avx512")
# the op schemas, the kernel variants and the direct entry (csrc/bind)
COMPILED = ("_C", *VARIANTS, "_C_bind")


def _wheel(out: Path) -> Path:
    """A wheel of the package as ``pip wheel`` lays it out (CPU kernels, no CUDA)."""
    package = ROOT / "dtl_kernels"
    files = [
        p
        for p in package.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix in (".py", ".json", ".yaml") or p.name.split(".")[0] in COMPILED)
    ]
    info = f"dtl_kernels-{__version__}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: dtl-kernels\nVersion: {__version__}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
        "Tag: cp311-cp311-linux_x86_64\n",
        f"{info}/entry_points.txt": "[console_scripts]\n"
        "dtl-train = dtl_kernels.train.cli:main\ndtl-predict = dtl_kernels.predict_cli:main\n",
    }  # fmt: skip
    path = out / f"dtl_kernels-{__version__}-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:  # stored: the kernels are large, speed matters
        for f in files:
            z.write(f, f.relative_to(ROOT).as_posix())
        for name, text in meta.items():
            z.writestr(name, text)
        record = [f.relative_to(ROOT).as_posix() + ",," for f in files] + [f"{n},," for n in meta]
        z.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return path


def test_a_wheel_missing_a_module_fails_in_a_fresh_venv(tmp_path):
    import sysconfig

    if not all(list((ROOT / "dtl_kernels").glob(f"{v}.*.so")) for v in VARIANTS):
        pytest.skip("the CPU kernels are not built in this checkout")
    assert "dtl_kernels.predict" in source_modules()
    deps = sysconfig.get_paths()["purelib"]
    wheel = _wheel(tmp_path)
    good = check(wheel, deps, tmp_path / "good")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "dtl-predict (dtl_kernels)" in good.stdout  # its console script ran from the venv
    (tmp_path / "broken").mkdir()
    bad = check(without(wheel, DROPPED, tmp_path / "broken"), deps, tmp_path / "broken")
    assert bad.returncode != 0 and "the wheel lacks dtl_kernels.predict" in bad.stderr, bad.stderr
