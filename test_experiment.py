"""Smoke test of experiment.py: the whole protocol on tiny sizes, so the script cannot rot.

    pytest test_experiment.py -q        # about a minute on an idle CPU

Two Meta-World tasks, two expert episodes each at 32 px with a 5x5 grid and 4-step windows, two
training steps per stage, one evaluation episode of three steps per task. It checks that the
script runs preprocess.py -> amplify.py -> eval_libero.py end to end and prints the table, that a
second invocation skips every finished step and prints the same table, and that changed settings
are refused rather than mixed into the same output directory. Skipped where Meta-World or OpenCV
is absent (fails under CI=true, see conftest.need).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need

HERE = Path(__file__).resolve().parent
TINY = ["--tasks", "reach-v3,button-press-topdown-v3", "--zero-shot-tasks", "button-press-topdown-v3",
        "--episodes", "2", "--img-size", "32", "--grid", "5", "--T", "4", "--shots", "1",
        "--tokenizer-steps", "2", "--forward-steps", "2", "--inverse-steps", "2", "--finetune-steps", "1",
        "--batch-size", "2", "--eval-episodes", "1", "--max-steps", "3", "--workers", "1"]
STEPS = ["data", "tokenizer", "forward"] + [f"{s}-{part}" for s in ("fewshot1", "zeroshot") for part in (
    "amplify-inverse", "amplify-finetune", "bc-inverse", "amplify-eval", "bc-eval")]


def run_experiment(out, *extra):
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(HERE / "experiment.py"), "--out", str(out), *TINY, *extra],
                          capture_output=True, text=True, timeout=900, cwd=HERE, env=env)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    need("metaworld")
    need("cv2")  # preprocess.py's offline tracker
    out = tmp_path_factory.mktemp("experiment") / "run"
    proc = run_experiment(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def table_of(stdout):
    """The printed table: from its first line to the line before the closing summary."""
    start = stdout.index("AMPLIFY on Meta-World")
    return stdout[start:stdout.index("ran ", start)].strip()


def test_runs_every_step_and_prints_the_table(first_run):
    out, proc = first_run
    for name in STEPS:
        assert f"run   {name}" in proc.stdout and f"done  {name}" in proc.stdout, name
    table = table_of(proc.stdout)
    assert table + "\n" == (out / "results.md").read_text().strip() + "\n"
    rows = [line for line in table.splitlines() if line.startswith("|")]
    header = rows[0]
    assert "AMPLIFY" in header and "inverse only (BC)" in header
    few = next(r for r in rows if r.startswith("| few-shot, 1 demo/task |") and "x 1 |" in r)
    zero = next(r for r in rows if r.startswith("| zero-shot on button-press-topdown-v3 |") and "x 1 |" in r)
    assert "(0/2)" in few or "(1/2)" in few or "(2/2)" in few  # 2 tasks x 1 episode per method
    assert zero.count("/1)") == 2  # the held-out task only, both methods
    for label in ("tokenizer reconstruction", "forward prediction", "reference: no motion predicted"):
        row = next(r for r in rows if r.startswith(f"| {label}"))
        mse, pixel_acc, delta_auc = (float(x) for x in row.split("|")[2:5])
        assert mse >= 0 and 0 <= pixel_acc <= 1 and 0 <= delta_auc <= 1, row
    assert "0.913" in table and "0.629" in table  # the paper's LIBERO figures beside ours
    assert "Total time of all steps" in table


def test_protocol_reaches_the_command_lines(first_run):
    out, _ = first_run
    done = json.loads((out / "steps.json").read_text())
    assert sorted(done) == sorted(STEPS)
    cmd = {name: " ".join(s["cmd"]) for name, s in done.items()}
    assert "--shots 1" in cmd["fewshot1-amplify-inverse"] and "--shots 1" in cmd["fewshot1-bc-inverse"]
    assert "--no-codes" in cmd["fewshot1-bc-inverse"] and "--no-codes" not in cmd["fewshot1-amplify-inverse"]
    assert "--predicted-codes" in cmd["fewshot1-amplify-finetune"]
    assert "--steps 3" in cmd["fewshot1-bc-inverse"]  # the baseline gets inverse + fine-tuning steps
    zero_bc = done["zeroshot-bc-inverse"]["cmd"]
    assert zero_bc[zero_bc.index("--exclude-task") + 1] == "button press topdown"
    results = json.loads((out / "eval" / "zeroshot-amplify" / "results.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["button-press-topdown-v3"]
    assert results["complete"] is True
    fewshot = json.loads((out / "eval" / "fewshot1-bc" / "results.json").read_text())
    assert [t["task"] for t in fewshot["tasks"]] == ["reach-v3", "button-press-topdown-v3"]
    # The AMPLIFY policy directory loads as a whole; the baseline needs no motion models.
    for f in ("tokenizer.pt", "forward.pt", "inverse.pt", "inverse_ft.pt"):
        assert (out / "policies" / "fewshot1-amplify" / f).exists(), f
    assert not (out / "policies" / "fewshot1-bc" / "forward.pt").exists()


def test_second_invocation_skips_finished_steps(first_run):
    out, proc = first_run
    again = run_experiment(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for name in STEPS:
        assert f"skip  {name}" in again.stdout, name
    assert "run   " not in again.stdout
    assert "ran 0 steps, skipped 13" in again.stdout
    assert table_of(again.stdout) == table_of(proc.stdout)


def test_other_settings_in_the_same_out_are_refused(first_run):
    out, _ = first_run
    before = (out / "steps.json").read_text()
    proc = run_experiment(out, "--tokenizer-steps", "3")
    assert proc.returncode != 0
    assert "step 'tokenizer'" in proc.stderr and "use a new --out" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (out / "steps.json").read_text() == before


@pytest.mark.parametrize("flags, message", [
    (["--zero-shot-tasks", "reach-v3,button-press-topdown-v3"], "--zero-shot-tasks"),
    (["--shots", "two"], "--shots"),
    (["--episodes", "1"], "--episodes"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, flags, message):
    proc = run_experiment(tmp_path / "run", *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
