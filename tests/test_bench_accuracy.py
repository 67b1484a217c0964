"""The accuracy study's logic (benchmarks/bench_accuracy.py and its accuracy_* modules) with
the training runs replaced by a fake: the lr grid grows past an edge winner, drop path by
coordinate search, ties go to the lower validation loss, the paired bootstrap CI, the
test split only after selection, which files each mode may write, and ``--plan``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy_report as R  # noqa: E402
import accuracy_runs as AR  # noqa: E402
import accuracy_search as S  # noqa: E402
import bench_accuracy as B  # noqa: E402
from accuracy_stats import bootstrap_ci, paired_bootstrap_ci  # noqa: E402

# the older committed results, which no mode of the new driver may write
OLDER = ["accuracy.csv", "accuracy.md", "accuracy.png", "accuracy_runs.csv",
         "accuracy_bf16.csv", "accuracy_bf16.md", "accuracy_bf16.png", "accuracy_bf16_runs.csv",
         "accuracy_bf16_check.md", "accuracy_bf16_check_runs.csv"]  # fmt: skip
STUDY = ["accuracy_study.csv", "accuracy_study.md", "accuracy_study.png",
         "accuracy_study_runs.csv"]  # fmt: skip
QUICK = ["accuracy_quick.csv", "accuracy_quick.md", "accuracy_quick.png",
         "accuracy_quick_runs.csv"]  # fmt: skip


def summary(acc: float, loss: float = 0.5, **kw) -> dict:
    """A dtl-train summary.json as the study reads it."""
    base = dict(test_acc=acc, test_loss=loss, trainable_params=1000, peak_memory_bytes=2**27,
                images_per_s=10.0, wall_time_s=100.0, train_images=800, test_images=200,
                epochs=30, device="cpu", evaluated_on="val", precision="bf16")  # fmt: skip
    return {**base, **kw}


def make_run(variant="dtl"):
    return lambda lr, dp: AR.Run("dinov2", "elpv", variant, "select", lr, 0, 30, drop_path=dp)


class Fake:
    """``evaluate`` with a made-up validation accuracy per (lr, drop path); records calls."""

    def __init__(self, acc, loss=lambda lr, dp: 0.5):
        self.acc, self.loss, self.asked = acc, loss, []

    def __call__(self, runs):
        self.asked += runs
        return {r: summary(self.acc(r.lr, r.drop_path), self.loss(r.lr, r.drop_path)) for r in runs}


def peaked_at(best: float, dp_gain: float = -0.01):
    """Accuracy falling with the log-distance from ``best``; drop path adds ``dp_gain``."""
    return lambda lr, dp: 0.8 - 0.01 * abs(math.log10(lr / best)) + (dp_gain if dp else 0)


def grid_of(fake, dp=0.0):
    return sorted(r.lr for r in fake.asked if r.drop_path == dp)


# -- the search -----------------------------------------------------------------------------------
def test_half_decade_steps_give_clean_values():
    assert [S.half_decade(x, 1) for x in (1e-2, 3e-2, 1e-1)] == [3e-2, 1e-1, 3e-1]
    assert [S.half_decade(x, -1) for x in (1e-3, 3e-4, 1e-5)] == [3e-4, 1e-4, 3e-6]
    assert f"{S.half_decade(1e-4, -1):g}" == "3e-05"  # run folder names stay short


def test_an_interior_winner_needs_no_extension():
    fake = Fake(peaked_at(3e-3))
    sel = S.select("dtl", make_run(), fake)
    assert grid_of(fake) == [1e-3, 3e-3, 1e-2, 3e-2] and sel.extensions == 0
    assert sel.pick.lr == 3e-3 and not sel.at_edge


def test_the_grid_grows_past_an_edge_winner_until_it_is_inside():
    fake = Fake(peaked_at(1e-1))  # above the dtl grid's top (3e-2)
    sel = S.select("dtl", make_run(), fake)
    assert grid_of(fake) == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]  # 1e-1 wins, then inside
    assert (sel.pick.lr, sel.extensions, sel.at_edge) == (1e-1, 2, False)
    fake = Fake(peaked_at(1e-3 / 10**0.5))  # 3e-4, below the bottom: one step is enough…
    sel = S.select("dtl", make_run(), fake)
    assert grid_of(fake)[:2] == [1e-4, 3e-4] and sel.pick.lr == 3e-4  # …1e-4 confirms it


def test_extensions_stop_after_two_and_the_edge_is_reported():
    fake = Fake(lambda lr, dp: min(0.9, 0.5 + lr))  # better and better with lr
    sel = S.select("full", make_run("full"), fake)
    assert grid_of(fake) == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    assert (sel.extensions, sel.pick.lr, sel.at_edge) == (2, 1e-3, True)


def test_drop_path_is_a_coordinate_search():
    fake = Fake(peaked_at(1e-2, dp_gain=-0.01))  # drop path hurts: one run at the best lr
    sel = S.select("dtl", make_run(), fake)
    assert [r.lr for r in fake.asked if r.drop_path] == [1e-2]
    assert (sel.pick.lr, sel.pick.drop_path) == (1e-2, 0.0)
    fake = Fake(peaked_at(1e-2, dp_gain=0.02))  # it helps: its lr neighbours too
    sel = S.select("dtl", make_run(), fake)
    assert grid_of(fake, dp=S.DROP_PATH) == [3e-3, 1e-2, 3e-2]
    assert (sel.pick.lr, sel.pick.drop_path) == (1e-2, 0.1)
    gain = {1e-2: 0.001, 3e-3: 0.05}  # drop path helps at the best lr, more at a neighbour
    fake = Fake(lambda lr, dp: 0.8 - abs(lr - 1e-2) + (gain.get(lr, 0) if dp else 0))
    sel = S.select("dtl", make_run(), fake)
    assert (sel.pick.lr, sel.pick.drop_path) == (3e-3, 0.1)
    fake = Fake(peaked_at(1e-2, dp_gain=0.02))
    S.select("linear", make_run("linear"), fake)
    assert not [r for r in fake.asked if r.drop_path]  # no drop-path search for linear


def test_ties_in_accuracy_go_to_the_lower_validation_loss():
    acc = lambda lr, dp: 0.75 if lr in (3e-3, 1e-2) else 0.7  # noqa: E731
    for low in (3e-3, 1e-2):
        fake = Fake(acc, loss=lambda lr, dp, low=low: 0.4 if lr == low else 0.6)
        sel = S.select("lora", make_run("lora"), fake)
        assert (sel.pick.lr, sel.pick.drop_path) == (low, 0.0)
    run = make_run()(1e-2, 0.0)
    assert S.selection_key(run, dict(AR.DIVERGED)) < S.selection_key(run, summary(0.0, 99.0))


def test_one_value_grid_has_nothing_to_choose():
    fake = Fake(peaked_at(1e-4))
    sel = S.select("full", make_run("full"), fake, grid=(1e-4,))
    assert fake.asked == [] and sel.pick.lr == 1e-4 and not sel.results


# -- statistics -----------------------------------------------------------------------------------
def test_paired_bootstrap_ci():
    # per-seed differences 1, 2, 3: a resample of three 1s (p = 1/27 > 2.5 %) bounds the CI
    a, b = {0: 80.0, 1: 82.0, 2: 84.0, 7: 50.0}, {0: 79.0, 1: 80.0, 2: 81.0}
    mean, low, high, n = paired_bootstrap_ci(a, b)
    assert (mean, low, high, n) == (2.0, 1.0, 3.0, 3)  # seed 7 has no pair
    assert paired_bootstrap_ci(a, b) == (mean, low, high, n)  # a fixed RNG
    # pairing matters: unpaired, the spread of each method would widen the interval
    _, ulow, uhigh = bootstrap_ci([80.0, 82.0, 84.0])
    assert uhigh - ulow > high - low
    assert paired_bootstrap_ci({0: 70.0, 1: 72.0}, {0: 69.5, 1: 71.5})[:3] == (0.5, 0.5, 0.5)
    m, lo, hi, _ = paired_bootstrap_ci({s: s % 3 + 0.1 * s for s in range(20)},
                                       {s: 0.0 for s in range(20)})  # fmt: skip
    assert lo < m < hi and hi - lo < 2
    assert paired_bootstrap_ci({0: 1.0}, {1: 1.0}) is None
    with pytest.raises(ValueError):
        bootstrap_ci([])


# -- the study end to end, with a fake dtl-train ------------------------------------------------
VAL = {"linear": 0.70, "lora": 0.78, "dtl": 0.76, "full": 0.74}


def fake_execute(log):
    """accuracy_runs.execute stand-in: a validation accuracy peaked per variant, test
    accuracy by variant and seed (never seen by the selection)."""

    def execute(run, root, reuse_only=False):
        if reuse_only:
            return None  # this fake keeps no run folders
        log.append(run)
        if run.phase == "select":
            best = S.LR_GRIDS[run.variant][1]
            return summary(VAL[run.variant] - 0.01 * abs(math.log10(run.lr / best)))
        return summary(VAL[run.variant] + 0.01 * run.seed, evaluated_on="test", train_images=1000)

    return execute


def fill(folder: Path, names: list[str]) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(f"committed {n}".encode())
    return {n: (folder / n).read_bytes() for n in names}


def test_main_study_selects_on_validation_then_tests_and_reports(tmp_path, monkeypatch):
    log = []
    monkeypatch.setattr(B, "execute", fake_execute(log))
    results = tmp_path / "results"
    before = fill(results, OLDER + QUICK)
    code = B.main(["--backbones", "dinov2", "--datasets", "elpv", "--variants", "linear", "lora",
                   "dtl", "full", "--seeds", "3", "--results", str(results), "--out",
                   str(tmp_path / "runs")])  # fmt: skip
    assert code == 0
    tests = [r for r in log if r.phase == "test"]
    for variant in VAL:  # each tested at the lr its validation runs picked, seeds 0-2
        picked = {(r.lr, r.drop_path, r.seed) for r in tests if r.variant == variant}
        assert picked == {(S.LR_GRIDS[variant][1], 0.0, s) for s in range(3)}, variant
        first_test = log.index(next(r for r in tests if r.variant == variant))
        assert all(r.phase == "select" for r in log[:first_test] if r.variant == variant)
    assert {n: (results / n).read_bytes() for n in before} == before  # untouched
    assert sorted(p.name for p in results.iterdir()) == sorted(OLDER + QUICK + STUDY)
    rows = (results / "accuracy_study.csv").read_text().splitlines()
    lora = next(x for x in rows if ",lora," in x)
    assert lora.startswith("dinov2,elpv,lora,79.0,1.0,3,") and ",2.0,2.0,2.0,3," in lora
    text = (results / "accuracy_study.md").read_text()
    assert "| dinov2 | elpv | lora | 79.00 ± 1.00 (3) |" in text
    assert "+2.00 [2.00, 2.00] (3)" in text  # lora − dtl on the same seeds
    assert "coordinate search" in text and "no drop-path search" in text
    assert "this CI is coarse" in text and "Not finished" not in text
    runs_csv = (results / "accuracy_study_runs.csv").read_text()
    assert runs_csv.count(",select,") == len([r for r in log if r.phase == "select"])


def test_quick_writes_only_its_own_files(tmp_path, monkeypatch):
    log = []
    monkeypatch.setattr(B, "execute", fake_execute(log))
    results = tmp_path / "results"
    before = fill(results, OLDER + STUDY)
    assert B.main(["--quick", "--variants", "dtl", "lora", "--results", str(results)]) == 0
    assert {r.phase for r in log} == {"quick"} and {r.seed for r in log} == {0}
    assert {n: (results / n).read_bytes() for n in before} == before
    assert sorted(p.name for p in results.iterdir()) == sorted(OLDER + STUDY + QUICK)
    assert B.parse_args(["--quick"]).out == Path("runs/accuracy-quick")  # its own run folders


def test_no_mode_can_name_another_modes_files(tmp_path):
    quick = {p.name for p in R.output_paths(tmp_path, True).values()}
    main = {p.name for p in R.output_paths(tmp_path, False).values()}
    assert quick == set(QUICK) and main == set(STUDY)
    for name in STUDY + OLDER:
        with pytest.raises(ValueError, match="quick accuracy study does not write"):
            R.write_output(tmp_path / name, True, lambda p: p.write_text("x"))
    for name in QUICK + OLDER:
        with pytest.raises(ValueError, match="main accuracy study does not write"):
            R.write_output(tmp_path / name, False, lambda p: p.write_text("x"))
    assert not list(tmp_path.iterdir())


def finish(root: Path, run: AR.Run, s: dict) -> None:
    """Lay out a finished run's folder as dtl-train leaves it."""
    folder = run.folder(root)
    folder.mkdir(parents=True, exist_ok=True)  # execute writes its provenance first
    (folder / "config.json").write_text(json.dumps(run.options()))
    (folder / "summary.json").write_text(json.dumps(s))


def test_plan_prints_every_run_and_runs_nothing(tmp_path, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("--plan ran something")

    monkeypatch.setattr(B, "execute", refuse)
    root, results = tmp_path / "runs", tmp_path / "results"
    done = AR.Run("dinov2", "elpv", "dtl", "select", 1e-3, 0, 30)
    finish(root, done, summary(0.7))
    argv = ["--plan", "--backbones", "dinov2", "--datasets", "elpv", "--variants", "dtl",
            "linear", "--out", str(root), "--results", str(results)]  # fmt: skip
    assert B.main(argv) == 0
    out = capsys.readouterr().out
    todo = [x for x in out.splitlines() if x.strip().startswith("todo")]
    assert len(todo) == 3 + 5  # dtl: 3 of its 4 lrs (one is done); linear: 5
    assert str(done.folder(root)) not in out and str(AR.Run(
        "dinov2", "elpv", "dtl", "select", 3e-3, 0, 30).folder(root)) in out  # fmt: skip
    # later: dtl ≥ 1 drop-path run + 3 seeds, ≤ 2 extensions + 3 drop-path runs + 3 seeds;
    # linear ≥ 3 seeds, ≤ 2 extensions + 3 seeds
    assert "estimated 15-21 run(s) to do in all" in out
    assert "1 already done" in out and "of one core" in out
    assert not results.exists()


def test_reuse_only_tables_from_what_has_finished(tmp_path, monkeypatch):
    root, results = tmp_path / "runs", tmp_path / "results"
    for lr in (3e-4, 1e-3, 3e-3, 1e-2):  # lora's selection has finished…
        finish(root, AR.Run("dinov2", "elpv", "lora", "select", lr, 0, 30),
               summary(0.8 - abs(lr - 3e-3)))  # fmt: skip
    finish(root, AR.Run("dinov2", "elpv", "lora", "select", 3e-3, 0, 30, drop_path=0.1),
           summary(0.7))  # fmt: skip
    finish(root, AR.Run("dinov2", "elpv", "lora", "test", 3e-3, 1, 30), summary(0.81))
    finish(root, AR.Run("dinov2", "elpv", "dtl", "select", 1e-2, 0, 30), summary(0.75))
    argv = ["--reuse-only", "--backbones", "dinov2", "--datasets", "elpv", "--variants",
            "lora", "dtl", "--lrs", "dtl=1e-2,3e-2", "--out", str(root), "--results",
            str(results)]  # fmt: skip
    assert B.main(argv) == 0
    text = (results / "accuracy_study.md").read_text()
    # the protocol names the grids searched: dtl's from --lrs, lora's the default ladder
    assert "grids searched here (lora {3e-4, 1e-3, 3e-3, 1e-2}; dtl {1e-2, 3e-2}" in text
    assert "| dinov2 | elpv | lora | 81.00 ± 0.00 (1) |" in text
    assert "dinov2 / elpv / lora: test: 2 seed(s)" in text
    assert "dinov2 / elpv / dtl: selection: 1 run(s) to do" in text
    # an untested cell's search so far is listed too
    assert "- dinov2 / elpv / dtl: 1e-2@0: 75.00/0.500" in text
    assert "0 seeds" not in text


def test_fewer_test_runs_never_replace_the_committed_tables(tmp_path, monkeypatch):
    """A fresh clone (no run folders) must not overwrite the committed study with a
    partial one; --replace-results does, on purpose."""
    monkeypatch.setattr(B, "execute", fake_execute([]))
    results = tmp_path / "results"

    def study(*extra, out="runs"):
        return B.main(["--backbones", "dinov2", "--datasets", "elpv", "--results", str(results),
                       "--out", str(tmp_path / out), *extra])  # fmt: skip

    assert study("--variants", "dtl", "linear") == 0  # 6 test runs
    committed = {n: (results / n).read_bytes() for n in STUDY}
    assert study("--variants", "dtl", "--seeds", "2") == 0  # 2 test runs
    assert {n: (results / n).read_bytes() for n in STUDY} == committed
    assert study("--reuse-only", "--fresh", "--variants", "dtl", out="empty") == 1  # no folders
    assert {n: (results / n).read_bytes() for n in STUDY} == committed
    assert study("--variants", "dtl", "--seeds", "2", "--replace-results") == 0
    assert R.committed_test_runs(results / "accuracy_study_runs.csv") == 2


# -- run folders --------------------------------------------------------------------------------
def test_run_folders_are_reused_only_for_identical_options(tmp_path):
    run = AR.Run("dinov2", "elpv", "lora-tail", "select", 1e-3, 0, 30)
    finish(tmp_path, run, summary(0.7))
    assert AR.finished(run, tmp_path)["test_acc"] == 0.7
    other = AR.Run("dinov2", "elpv", "lora-tail", "select", 1e-3, 0, 30, warmup_share=0.2)
    assert other.folder(tmp_path) != run.folder(tmp_path)
    config = run.folder(tmp_path) / "config.json"
    config.write_text(json.dumps({**run.options(), "lora_blocks": "1-12"}))
    assert AR.finished(run, tmp_path) is None  # same folder, other options: not reused
    (run.folder(tmp_path) / "diverged.json").write_text(json.dumps({"options": run.options()}))
    assert AR.finished(run, tmp_path)["diverged"] is True


def interrupt(root: Path, run: AR.Run, options: dict) -> None:
    """Lay out a run stopped after its first epoch: one checkpoint recording ``options``."""
    import torch

    from dtl_kernels.train import checkpoint as ckpt

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    ckpt.save_checkpoint(run.folder(root), 1, model, opt, sched, [{"epoch": 1}], options)


def test_an_interrupted_run_resumes_and_one_of_other_options_starts_afresh(tmp_path, monkeypatch):
    calls = []

    def train(cmd, **kw):  # dtl-train stand-in: the run finishes in its folder
        import subprocess

        calls.append(cmd)
        folder = Path(cmd[cmd.index("--output") + 1])
        (folder / "config.json").write_text(json.dumps(run.options()))
        (folder / "summary.json").write_text(json.dumps(summary(0.6)))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(AR.subprocess, "run", train)
    monkeypatch.setenv("DTL_GIT_REV", "abc")  # the provenance written after a run: no git call
    run = AR.Run("dinov2", "elpv", "dtl", "test", 1e-2, 2, 30)
    assert not AR.interrupted(run, tmp_path)  # no folder yet
    interrupt(tmp_path, run, run.options())
    assert AR.interrupted(run, tmp_path) and AR.finished(run, tmp_path) is None
    assert AR.execute(run, tmp_path)["test_acc"] == 0.6
    assert "--resume" in calls[-1] and "--overwrite" not in calls[-1]

    other = AR.Run("dinov2", "elpv", "dtl", "test", 1e-2, 3, 30)
    interrupt(tmp_path, other, {**other.options(), "drop_path": 0.1})  # not this run's options
    assert not AR.interrupted(other, tmp_path)
    run = other
    AR.execute(other, tmp_path)
    assert "--overwrite" in calls[-1] and "--resume" not in calls[-1]

    broken = AR.Run("dinov2", "elpv", "dtl", "test", 1e-2, 4, 30)
    (broken.folder(tmp_path) / "checkpoints").mkdir(parents=True)
    (broken.folder(tmp_path) / "checkpoints" / "epoch_0001.pt").write_bytes(b"not a checkpoint")
    assert not AR.interrupted(broken, tmp_path)  # unreadable: started afresh, never trusted


def test_variant_options_are_spelt_as_dtl_train_records_them():
    """Reuse compares a run's options with its config.json: lora-tail's blocks must come
    back from dtl-train exactly as the Run spells them."""
    from dtl_kernels.train import make_config

    opts = AR.Run("dinov2", "elpv", "lora-tail", "test", 1e-3, 0, 30).options()
    cfg = make_config({"method": "lora", "lora_blocks": opts["lora_blocks"]})
    assert cfg.lora_blocks == opts["lora_blocks"] == "7-12"


def test_a_diverged_run_is_recorded_once_and_ranks_last(tmp_path, monkeypatch):
    import subprocess

    calls = []

    def diverging(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 3, "", "dtl-train: error: non-finite loss")

    monkeypatch.setattr(AR.subprocess, "run", diverging)
    monkeypatch.setenv("DTL_GIT_REV", "abc")  # the provenance written after a run: no git call
    run = AR.Run("dinov2", "elpv", "linear", "select", 1e-1, 0, 30)
    assert AR.execute(run, tmp_path)["diverged"] and len(calls) == 1
    assert AR.execute(run, tmp_path)["diverged"] and len(calls) == 1  # not tried again
    assert AR.finished(run, tmp_path)["diverged"]

    fake = Fake(peaked_at(3e-2))  # 1e-1 would be next best, but diverges
    evaluate = lambda runs: {r: dict(AR.DIVERGED) if r.lr == 1e-1 else fake([r])[r] for r in runs}  # noqa: E731
    sel = S.select("linear", make_run("linear"), evaluate)
    assert sel.pick.lr == 3e-2 and "1e-1@0: diverged" in R.describe_selection(sel)


# -- the committed runs CSV stands for finished runs -----------------------------------------------
def test_a_fresh_clone_goes_on_from_the_runs_the_committed_csv_records(tmp_path, monkeypatch):
    """Without run folders, the rows of the committed accuracy_study_runs.csv stand for
    their runs: nothing recorded is trained again, the tables come back unchanged, and a
    new variant trains only its own runs. ``--fresh`` counts run folders only."""
    log = []
    monkeypatch.setattr(B, "execute", fake_execute(log))
    results = tmp_path / "results"

    def study(*variants, out, extra=()):
        return B.main(["--backbones", "dinov2", "--datasets", "elpv", "--max-train", "1000",
                       "--results", str(results), "--out", str(tmp_path / out), "--variants",
                       *variants, *extra])  # fmt: skip

    assert study("dtl", "lora", out="first") == 0
    first = len(log)
    committed = {n: (results / n).read_bytes() for n in STUDY if not n.endswith(".png")}
    assert study("dtl", "lora", out="clone") == 0
    assert len(log) == first  # nothing trained again
    assert {n: (results / n).read_bytes() for n in committed} == committed
    assert study("dtl", "lora", "linear", out="clone") == 0
    assert {r.variant for r in log[first:]} == {"linear"}
    assert "| dinov2 | elpv | lora |" in (results / "accuracy_study.md").read_text()
    before = len(log)
    assert study("dtl", out="clone2", extra=["--fresh", "--replace-results"]) == 0
    assert len(log) > before and {r.variant for r in log[before:]} == {"dtl"}


def test_a_recorded_row_keeps_its_own_date_and_revision(tmp_path):
    run = AR.Run("dinov2", "fashion-mnist", "dtl", "test", 1e-2, 1, 30)
    s = summary(0.83, evaluated_on="test", train_images=1000, test_images=10000,
                precision="bf16", torch_threads=1)  # fmt: skip
    env = dict(device="a machine", torch="9.9", triton="-", date="2026-01-01", git_rev="abc")
    path = tmp_path / "runs.csv"
    from accuracy_tables import write_csv

    write_csv(path, R.RUN_FIELDS, [R.run_row(run, s)], env)
    got = R.recorded_runs(path)[run.record_key()]
    assert got["test_acc"] == pytest.approx(0.83) and got["trainable_params"] == 1000
    later = dict(env, date="2027-01-01", git_rev="def")
    write_csv(path, R.RUN_FIELDS, [R.run_row(run, got)], later)
    row = path.read_text().splitlines()[1]
    assert row.endswith(",9.9,-,2026-01-01,abc") and "def" not in row
    assert R.recorded_runs(path)[run.record_key()]["test_acc"] == pytest.approx(0.83)


def test_recorded_rows_are_matched_exactly_and_read_as_untrusted(tmp_path, capsys):
    run = AR.Run("dinov2", "elpv", "lora-r1", "select", 3e-3, 0, 30, max_train=1000)
    diverged = AR.Run("dinov2", "elpv", "lora-r1", "select", 1e-2, 0, 30, max_train=1000)
    rows = [R.run_row(run, summary(0.775)), R.run_row(diverged, dict(AR.DIVERGED))]
    bad = [dict(rows[0], seed=s, acc=acc) for s, acc in ((5, "nan"), (6, "150"), (7, "x"))]
    bad += [{**rows[0], "seed": 8, "epochs": ""}, {**rows[0], "options_sha": "not-a-digest"},
            {**rows[0], "wall_s": "-1"}, {**rows[0], "images_per_s": "inf"},
            {**rows[0], "evaluated_on": "test"}, {**rows[0], "options_sha": ""}]  # fmt: skip
    from accuracy_tables import write_csv

    write_csv(tmp_path / "runs.csv", R.RUN_FIELDS, rows + bad, {"date": "d"})
    got = R.recorded_runs(tmp_path / "runs.csv")
    assert "9 row(s) that do not read back as runs were left out" in capsys.readouterr().out
    assert got[run.record_key()]["test_acc"] == pytest.approx(0.775)
    assert got[diverged.record_key()]["diverged"] is True
    assert len(got) == 2
    # every option of the run is in its key: changing any one is another run
    base = dict(backbone="dinov2", dataset="elpv", variant="lora-r1", phase="select", lr=3e-3,
                seed=0, epochs=30, max_train=1000)  # fmt: skip
    for change in (dict(lr=1e-3), dict(drop_path=0.1), dict(epochs=10), dict(max_train=999),
                   dict(max_train=None), dict(phase="test"), dict(variant="lora"),
                   dict(precision="fp32"), dict(warmup_share=0.2), dict(seed=1),
                   dict(extra={"weight_decay": 0.1}), dict(dataset="fashion-mnist")):  # fmt: skip
        other = AR.Run(**{**base, **change})
        assert other.options() != run.options(), change
        assert other.record_key() not in got, change
    assert R.recorded_runs(tmp_path / "missing.csv") == {}
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert R.recorded_runs(tmp_path / "binary.csv") == {}


def test_a_run_folder_wins_over_a_recorded_row(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "execute", fake_execute([]))
    results, root = tmp_path / "results", tmp_path / "runs"
    run = AR.Run("dinov2", "elpv", "dtl", "select", 1e-2, 0, 30, max_train=1000)
    from accuracy_tables import write_csv

    results.mkdir()
    write_csv(results / "accuracy_study_runs.csv", R.RUN_FIELDS,
              [R.run_row(run, summary(0.5))], {})  # fmt: skip
    finish(root, run, summary(0.9))
    args = B.parse_args(["--results", str(results), "--out", str(root), "--max-train", "1000"])
    assert B.executing(args)([run])[run]["test_acc"] == 0.9
    assert B.Planner(root, B.recorded_of(args))([run])[run]["test_acc"] == 0.9
    (run.folder(root) / "summary.json").unlink()
    assert B.executing(args)([run])[run]["test_acc"] == 0.5


def test_a_run_folder_keeps_where_and_at_which_revision_it_trained(tmp_path, monkeypatch):
    """A report written later, from other code, never stamps its own revision on runs it
    reads from folders: a folder's provenance.json (written when its run starts) wins; a
    folder without one takes the committed row's only where that row is this folder's run
    (same numbers; never the row's device), else what the folder says (revision unknown).
    The file is untrusted."""
    import os
    import subprocess

    results, root = tmp_path / "results", tmp_path / "runs"
    run = AR.Run("dinov2", "elpv", "dtl", "select", 1e-2, 0, 30, max_train=1000)
    trained = dict(device="cuda:0", torch="1.0", triton="3.0", date="2026-01-01", git_rev="aaa")
    from accuracy_tables import write_csv

    results.mkdir()
    csv_path = results / "accuracy_study_runs.csv"
    write_csv(csv_path, R.RUN_FIELDS, [R.run_row(run, summary(0.9))], trained)
    finish(root, run, summary(0.9, torch_version="1.0"))  # the row's run: same numbers
    args = B.parse_args(["--results", str(results), "--out", str(root), "--max-train", "1000"])
    got = B.executing(args)([run])[run]
    assert got["test_acc"] == 0.9 and got["recorded"]["git_rev"] == "aaa"
    assert got["recorded"]["date"] == "2026-01-01" and got["recorded"]["device"] == "cpu"
    assert R.run_row(run, got)["device"] == "cpu"  # the folder's own, not the row's cuda:0
    assert B.Planner(root, B.recorded_of(args))([run])[run]["recorded"] == got["recorded"]
    # a row of another run (other numbers): the folder's own account, revision unknown
    write_csv(csv_path, R.RUN_FIELDS, [R.run_row(run, summary(0.5))], trained)
    got = B.executing(args)([run])[run]
    assert got["recorded"]["git_rev"] == "unknown" and got["recorded"]["torch"] == "1.0"
    own = dict(device="cpu", torch="2.0", triton="3.0", date="2026-02-02", git_rev="bbb")
    prov = run.folder(root) / "provenance.json"
    prov.write_text(json.dumps(own))
    assert B.executing(args)([run])[run]["recorded"] == own
    for bad in ("{not json", json.dumps(dict(own, extra="x")), json.dumps(dict(own, torch=3)),
                json.dumps(dict(own, date="x" * 500)), json.dumps([1, 2]),
                json.dumps(own) + " " * 5000):  # fmt: skip
        prov.write_text(bad)
        assert B.executing(args)([run])[run]["recorded"]["git_rev"] == "unknown", bad
    prov.unlink()
    os.mkfifo(prov)  # never opened: a FIFO would block the read
    assert AR.read_provenance(run.folder(root)) is None
    prov.unlink()

    # execute: the provenance of the run's start, kept across a resume
    other = AR.Run("dinov2", "elpv", "dtl", "select", 3e-2, 0, 30, max_train=1000)
    monkeypatch.setenv("DTL_GIT_REV", "at-launch")

    def fake_run(cmd, **kwargs):
        os.environ["DTL_GIT_REV"] = "committed-while-it-trained"
        if not other.folder(root).joinpath("summary.json").exists():
            finish(root, other, summary(0.7))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(AR.subprocess, "run", fake_run)
    got = AR.execute(other, root)
    assert got["test_acc"] == 0.7 and got["recorded"]["git_rev"] == "at-launch"
    assert set(got["recorded"]) == set(AR.PROVENANCE) and got["recorded"]["device"] == "cpu"
    monkeypatch.setattr(AR, "interrupted", lambda run, root: True)
    (other.folder(root) / "summary.json").unlink()  # as if interrupted: --resume
    assert AR.execute(other, root)["recorded"]["git_rev"] == "at-launch"  # its first start
    monkeypatch.setattr(AR, "interrupted", lambda run, root: False)
    (other.folder(root) / "summary.json").unlink()  # started afresh: --overwrite
    assert AR.execute(other, root)["recorded"]["git_rev"] == "committed-while-it-trained"

    # a diverged run: its row says where it ran too
    diverging = AR.Run("dinov2", "elpv", "dtl", "select", 1e-1, 0, 30, max_train=1000)

    def diverges(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 3, "", "non-finite")

    monkeypatch.setattr(AR.subprocess, "run", diverges)
    got = AR.execute(diverging, root)
    assert got["diverged"] and got["recorded"]["device"] == "cpu"
    row = R.run_row(diverging, AR.finished(diverging, root))
    assert row["device"] == "cpu" and row["git_rev"] == "committed-while-it-trained"


def test_the_epoch_sweep_rows_carry_each_runs_own_provenance(tmp_path, monkeypatch):
    """accuracy_sweep.py: each row says where, when and at which revision its run trained
    (the folder's provenance file, else what the folder itself says), never the report's
    machine or revision; a run not trained yet is left out under --reuse-only."""
    import argparse
    import csv

    import accuracy_sweep as SW

    monkeypatch.setenv("DTL_GIT_REV", "report-rev")  # what this process would stamp
    root, results = tmp_path / "runs", tmp_path / "results"
    results.mkdir()
    lr = SW.BEST_LR["elpv", "dtl"]
    runs = {e: AR.Run("dinov2", "elpv", "dtl", "sweep", lr, 0, e, max_train=1000) for e in (3, 10)}
    own = dict(device="cuda", torch="2.0", triton="3.6", date="2026-01-02", git_rev="run-rev")
    finish(root, runs[3], summary(0.81))
    (runs[3].folder(root) / "provenance.json").write_text(json.dumps(own))
    finish(root, runs[10], summary(0.83, torch_version="1.9"))  # no provenance file
    args = argparse.Namespace(
        datasets=["elpv"],
        variants=["dtl"],
        epochs=[3, 10, 30],
        max_train=1000,
        out=root,
        reuse_only=True,
        results=results,
    )
    rows = SW.sweep(args)
    assert [r["epochs"] for r in rows] == [3, 10]  # 30 epochs never ran
    with open(results / "accuracy_sweep_runs.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert {k: written[0][k] for k in own} == own
    assert written[1]["git_rev"] == "unknown" and written[1]["torch"] == "1.9"
    assert written[1]["device"] == "cpu"  # the summary's own device
    assert all(r["git_rev"] != "report-rev" for r in written)


# -- accuracy_pairs: two variants on every common test seed --------------------------------
def _test_rows(variant: str, accs: dict[int, float], lr: float = 1e-2) -> list[dict]:
    runs = [AR.Run("dinov2", "elpv", variant, "test", lr, seed, 30) for seed in accs]
    return [R.run_row(run, summary(accs[run.seed], evaluated_on="test")) for run in runs]


def test_accuracy_pairs_compares_on_common_seeds_once_each(tmp_path, capsys):
    import accuracy_pairs as P
    from accuracy_tables import write_csv

    study, extra = tmp_path / "study.csv", tmp_path / "extra.csv"
    a3 = {0: 0.80, 1: 0.78, 2: 0.79}
    write_csv(study, R.RUN_FIELDS, _test_rows("dtl+k5", a3) + _test_rows("lora-tail", {
        0: 0.77, 1: 0.77, 2: 0.78}), {})  # fmt: skip
    # the extra file repeats seed 2 of A (counted once) and adds seeds 3, 4; B gets seed 3 only
    more = _test_rows("dtl+k5", {2: 0.79, 3: 0.81, 4: 0.70}) + _test_rows("lora-tail", {3: 0.80})
    bad = dict(more[0], acc="101")  # not a percentage: left out, and said so
    write_csv(extra, R.RUN_FIELDS, more + [bad], {})
    out, runs_out = tmp_path / "pairs.md", tmp_path / "pairs_runs.csv"
    assert P.main(["--runs", str(study), str(extra), "--pair", "dtl+k5", "lora-tail", "--out",
                   str(out), "--runs-out", str(runs_out)]) == 0  # fmt: skip
    text = out.read_text()
    assert "(1 row(s) left out)" in text
    row = next(line for line in text.splitlines() if line.startswith("| dinov2 | elpv |"))
    # A: 5 seeds (80, 78, 79, 81, 70); B: 4; Δ over the 4 common seeds: +3, +1, +1, +1 → +1.50
    assert "(5)" in row and "(4)" in row and "+1.50" in row and row.endswith("(4) |")
    assert len(runs_out.read_text().splitlines()) == 1 + 5 + 4


def test_accuracy_pairs_refuses_a_cell_tested_at_two_settings(tmp_path):
    import accuracy_pairs as P
    from accuracy_tables import write_csv

    path = tmp_path / "runs.csv"
    rows = _test_rows("dtl", {0: 0.7}) + _test_rows("dtl", {1: 0.7}, lr=3e-3)
    write_csv(path, R.RUN_FIELDS, rows + _test_rows("dtl+k5", {0: 0.8, 1: 0.8}), {})
    with pytest.raises(SystemExit, match="2 settings"):
        P.main(["--runs", str(path), "--pair", "dtl+k5", "dtl"])
    with pytest.raises(SystemExit):  # argparse: an unknown variant
        P.main(["--runs", str(path), "--pair", "dtl+k5", "nope"])


def test_accuracy_pairs_reads_the_seeds_the_files_lack_from_run_folders(tmp_path):
    """``--folders``: seeds 3 and 4 trained by ``bench_accuracy.py --seeds 5`` at the
    cell's test setting (its Run found by the row's options digest) join the comparison;
    a folder trained with other options does not."""
    import accuracy_pairs as P
    from accuracy_tables import write_csv

    study, root = tmp_path / "study.csv", tmp_path / "runs"
    rows = _test_rows("dtl+k5", {0: 0.8, 1: 0.8, 2: 0.8}) + _test_rows(
        "lora-tail", {0: 0.7, 1: 0.7, 2: 0.7}, lr=3e-3)  # fmt: skip
    write_csv(study, R.RUN_FIELDS, rows, {})
    for variant, lr, seed, acc in (
        ("dtl+k5", 1e-2, 3, 0.9),
        ("lora-tail", 3e-3, 3, 0.6),
        ("lora-tail", 1e-3, 4, 0.1),
    ):  # the last: another lr
        run = AR.Run("dinov2", "elpv", variant, "test", lr, seed, 30)
        finish(root, run, summary(acc, evaluated_on="test"))
    out = tmp_path / "pairs.md"
    assert P.main(["--runs", str(study), "--folders", str(root), "--pair", "dtl+k5",
                   "lora-tail", "--out", str(out)]) == 0  # fmt: skip
    row = next(line for line in out.read_text().splitlines() if "| elpv |" in line)
    # seeds 0-3 on both: Δ = 10, 10, 10, 30 → +15.00; A has 4 seeds, B 4 (seed 4 unmatched)
    assert "+15.00" in row and row.count("(4)") == 3


def test_accuracy_pairs_finds_the_folder_of_a_self_capped_dataset(tmp_path):
    """Fashion-MNIST caps itself at 1000 training images: a run with --max-train 1000 has
    the same options (digest) as one without, but its own folder (``-n1000``); the study's
    runs are in those folders."""
    import accuracy_pairs as P
    from accuracy_tables import write_csv

    def rows(variant, lr, accs):
        runs = [AR.Run("dinov2", "fashion-mnist", variant, "test", lr, s, 30) for s in accs]
        return [R.run_row(r, summary(accs[r.seed], evaluated_on="test", train_images=1000))
                for r in runs]  # fmt: skip

    study, root = tmp_path / "study.csv", tmp_path / "runs"
    write_csv(study, R.RUN_FIELDS, rows("dtl+k5", 1e-2, {0: 0.8}) + rows("lora-tail", 3e-3, {
        0: 0.7}), {})  # fmt: skip
    for variant, lr, acc in (("dtl+k5", 1e-2, 0.9), ("lora-tail", 3e-3, 0.6)):
        run = AR.Run("dinov2", "fashion-mnist", variant, "test", lr, 1, 30, max_train=1000)
        assert "-n1000" in run.folder(root).name
        finish(root, run, summary(acc, evaluated_on="test", train_images=1000))
    out = tmp_path / "pairs.md"
    assert P.main(["--runs", str(study), "--folders", str(root), "--pair", "dtl+k5",
                   "lora-tail", "--out", str(out)]) == 0  # fmt: skip
    row = next(line for line in out.read_text().splitlines() if "| fashion-mnist |" in line)
    assert "+20.00" in row and row.endswith("(2) |")  # seeds 0 and 1: Δ 10 and 30
