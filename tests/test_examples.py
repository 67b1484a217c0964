"""The examples in python/ run as a user would run them (in this process, small
arguments) and print what they promise."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "python"


def run_example(name: str, args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_multitask_serve(monkeypatch, capsys, one_thread):
    run_example("multitask_serve.py", ["--tasks", "2", "--batch", "2"], monkeypatch)
    out = capsys.readouterr().out
    errors = [float(e) for e in re.findall(r"max \|shared - separate\| = (\S+)", out)]
    assert len(errors) == 2 and max(errors) <= 1e-5, out
    assert "2 adapter files of" in out


def test_finetune_elpv(monkeypatch, capsys, tmp_path, one_thread):
    pytest.importorskip("elpv_dataset", reason="the elpv-dataset package is not installed")
    args = ["--epochs", "1", "--img-size", "32", "--output", str(tmp_path / "run")]
    run_example("finetune_elpv.py", args, monkeypatch)
    out = capsys.readouterr().out
    accuracy = re.search(r"test accuracy (\S+)% with 16,260 trainable parameters", out)
    assert accuracy and 0 <= float(accuracy.group(1)) <= 100, out
    assert len(re.findall(r"^cell \d \(defect probability", out, re.M)) == 2, out
    assert (tmp_path / "run" / "adapter.safetensors").exists()
