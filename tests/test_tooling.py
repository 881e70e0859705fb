"""The tools around the library: the GPU check script (its CPU dry run), the install's TORCH switch, the results
files' provenance and the docs' claims about where each figure comes from."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def test_gpu_check_dry_run_runs_every_stage_and_stamps_its_results(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    throughput = json.loads((tmp_path / "throughput_gpu.json").read_text())
    figures = throughput["mobilenetv2"]
    for key in ("end_to_end_pairs_per_s", "model_only_clip_pairs_per_s", "anchor_pairs_per_s",
                "model_only_over_anchor", "full_over_clip_step", "end_to_end_first_step_s",
                "frames_compiled_after_step_1"):
        assert key in figures, key
    overhead = json.loads((tmp_path / "objective_overhead_resnet18_gpu.json").read_text())
    assert overhead["clip"]["ratio"] == 1.0 and "full" in overhead
    reinforce = json.loads((tmp_path / "reinforce_gpu.json").read_text())
    assert reinforce["rows"] == 16 and reinforce["samples_per_s"] > 0
    study = json.loads((tmp_path / "short_study_gpu.json").read_text())
    assert {r["arm"] for r in study["runs"]} == {"clip", "recommended"} and len(study["runs"]) == 4
    accumulation = json.loads((tmp_path / "accumulation_gpu.json").read_text())
    arms = {(arm["batch"], arm["micro_batch"]): arm for arm in accumulation["arms"]}
    assert set(arms) == {(16, 8), (16, None)} and all(arm["peak_mib"] > 0 for arm in arms.values())
    for result in (throughput, overhead, reinforce, study, accumulation):
        stamp = result["provenance"]
        assert stamp["versions"]["torch"] and stamp["date"] and "hardware" in stamp
        assert result["command"].startswith("python ")


def test_gpu_check_refuses_a_machine_without_its_modules_and_no_wheels(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n[ \"$1\" = -c ] && case \"$2\" in *dill*) exit 1;; esac\nexec "
                    f"{sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"],
                          env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "lacks dill" in proc.stderr and "--wheels" in proc.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_changed_torch_reinstalls_and_the_same_one_does_not(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".lightclip-torch").write_text("torch==1.0 [test]\n")
    stamp = venv / ".lightclip-installed"
    stamp.touch()
    newer = (REPO / "setup.py").stat().st_mtime + 10
    os.utime(stamp, (newer, newer))

    def plan(torch_spec):
        return subprocess.run(["make", "-n", "-C", str(REPO), "setup", f"VENV={venv}", f"TORCH={torch_spec}",
                               "EXTRAS=test"], capture_output=True, text=True, timeout=60).stdout

    assert "pip install" not in plan("torch==1.0")
    again = plan("torch==2.0")
    assert "pip install -q torch==2.0" in again and ".lightclip-torch" in again


def test_every_results_file_says_where_it_comes_from():
    """Each JSON in benchmarks/results carries the command that wrote it and a provenance stamp (library
    versions, commit, date); files written before stamps existed say so and name the commit that added them."""
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        if path.name.endswith("_items.json"):
            continue   # per-item 0/1 lists behind a stamped results file of the same name
        data = json.loads(path.read_text())
        stamp = data.get("provenance")
        assert stamp and stamp.get("date") and stamp.get("commit"), f"{path.name} has no provenance"
        assert "versions" in stamp, path.name
        assert data.get("command"), f"{path.name} does not name its command"


def _expand_braces(pattern: str) -> list[str]:
    """`a_{x,y}.{md,json}` -> the four names (shell brace expansion, one level per group)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [name for option in match.group(1).split(",")
            for name in _expand_braces(pattern[:match.start()] + option + pattern[match.end():])]


def _docs():
    return [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_speak_to_users_and_cite_existing_results():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for path in _docs():
        text = path.read_text()
        assert not re.search(r"issue #?\d+|\(#\d+\)|#\d{1,2}\b", text, re.IGNORECASE), f"{path.name}: issue number"
        assert not re.search(r"this (session|machine)|development machine|previous session", text, re.IGNORECASE), \
            f"{path.name}: a note about our machines"
        for cited in re.findall(r"benchmarks/results/((?:[\w.\-*]|\{[^}]*\})+)", text):
            for name in _expand_braces(cited.rstrip(".")):
                assert list((REPO / "benchmarks" / "results").glob(name)), \
                    f"{path.name} cites benchmarks/results/{name}, which does not exist"
    for link in re.findall(r"\]\((docs/[\w.\-]+\.md)", readme):
        assert (REPO / link).is_file(), link
