"""Batch runs: shares without duplicates or gaps, resumable manifests, two processes under accelerate."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from editkit.commands.batch import Job, Manifest, ProcessShare, check_batch_outputs, run_batch
from editkit.errors import InputError


def _jobs(n):
    return [Job(key=f"job{i}", output=f"out{i}.txt", inputs={"i": str(i)}) for i in range(n)]


@pytest.mark.parametrize(("n", "count"), [(7, 2), (5, 3), (2, 4)])
def test_shares_cover_every_job_once(n, count):
    jobs = _jobs(n)
    taken = [job for index in range(count) for job in ProcessShare(index, count).take(jobs)]
    assert sorted(j.key for j in taken) == sorted(j.key for j in jobs)


def test_interrupted_batch_resumes_without_redoing(tmp_path):
    jobs, produced = _jobs(5), []

    def produce(task, fail_at=None):
        job = task.job
        if job.key == fail_at:
            raise KeyboardInterrupt
        assert task.pending == (job.output,)
        task.path(job.output).write_text(job.key)
        task.written(job.output)
        produced.append(job.key)
        return {"note": job.key.upper()}

    with pytest.raises(KeyboardInterrupt):
        run_batch(jobs, tmp_path, "test", {"a": 1}, lambda task: produce(task, fail_at="job3"))
    assert produced == ["job0", "job1", "job2"]
    with pytest.raises(InputError, match="other options"):  # resuming with other parameters is refused
        run_batch(jobs, tmp_path, "test", {"a": 2}, produce)
    path = run_batch(jobs, tmp_path, "test", {"a": 1}, produce)
    assert produced == ["job0", "job1", "job2", "job3", "job4"]
    manifest = json.loads(path.read_text())
    assert [e["key"] for e in manifest["outputs"]] == [j.key for j in jobs]
    assert manifest["params"] == {"a": 1} and manifest["outputs"][3]["note"] == "JOB3"
    assert not list(tmp_path.glob(".manifest.json.part-*"))
    (tmp_path / "out1.txt").unlink()  # a deleted output is redone on the next run
    run_batch(jobs, tmp_path, "test", {"a": 1}, produce)
    assert produced[-1] == "job1" and len(produced) == 6
    run_batch(jobs, tmp_path, "test", {"a": 3}, produce, overwrite=True)  # --overwrite starts afresh
    assert len(produced) == 11
    assert json.loads(path.read_text())["params"] == {"a": 3}


def test_multi_output_jobs_resume_with_only_the_missing_outputs(tmp_path):
    jobs = [Job(key=f"c{i}", output=(f"c{i}_s0.txt", f"c{i}_s1.txt")) for i in range(2)]
    written = []

    def produce(task, fail_on=None):
        for name in task.pending:
            if name == fail_on:
                raise KeyboardInterrupt
            task.path(name).write_text(name)
            task.written(name)
            written.append(name)

    with pytest.raises(KeyboardInterrupt):
        run_batch(jobs, tmp_path, "test", {}, lambda task: produce(task, fail_on="c0_s1.txt"))
    assert written == ["c0_s0.txt"]
    run_batch(jobs, tmp_path, "test", {}, produce)
    assert written == ["c0_s0.txt", "c0_s1.txt", "c1_s0.txt", "c1_s1.txt"]  # c0_s0 not written twice
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    listed = [name for entry in manifest["outputs"] for name in entry["output"]]
    assert sorted(listed) == sorted(written) and all(entry["done"] for entry in manifest["outputs"])


def test_unrecorded_files_in_the_way_are_refused(tmp_path):
    jobs = [Job("a", "a.png"), Job("b", "b.png")]
    (tmp_path / "b.png").write_text("precious")
    with pytest.raises(InputError, match="not recorded"):
        check_batch_outputs(jobs, tmp_path, "test", {}, overwrite=False)
    check_batch_outputs(jobs, tmp_path, "test", {}, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_batch_outputs(jobs, tmp_path / "file", "test", {}, overwrite=False)


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not an editkit manifest"):
        Manifest(tmp_path, "test", {})


def test_duplicate_outputs_are_refused(tmp_path):
    jobs = [Job("a", "same.png"), Job("b", "same.png")]
    with pytest.raises(InputError, match="unique"):
        run_batch(jobs, tmp_path, "test", {}, lambda task: None)


SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from editkit.commands.batch import Job, current_share, run_batch

    folder = Path(sys.argv[1])
    jobs = [Job(key=f"job{i}", output=f"out{i}.txt") for i in range(7)]
    share, _ = current_share()

    def produce(task):
        job = task.job
        (folder / job.output).write_text(str(share.index))
        with open(folder / f"log-{share.index}.txt", "a") as log:
            log.write(job.key + "\\n")
        return {}

    run_batch(jobs, folder, "test", {}, produce)
    """
)


def test_two_processes_under_accelerate_launch(tmp_path):
    script = tmp_path / "batch_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    logged = [line for p in sorted(out.glob("log-*.txt")) for line in p.read_text().split()]
    assert sorted(logged) == sorted(f"job{i}" for i in range(7))  # each exactly once
    assert len(list(out.glob("log-*.txt"))) == 2  # both processes worked
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["key"] for e in manifest["outputs"]] == [f"job{i}" for i in range(7)]
