"""The warm worker runs a script like Snakemake's `script:` would, without importing Snakemake."""
import json
from pathlib import Path
import subprocess
import sys
import threading

import pytest
from snakemake.iocontainers import InputFiles, Log, OutputFiles, Params, Wildcards

from diffattr.worker import run_script

JOB_SCRIPT = """
import json, sys
job = snakemake
result = {
    "snakemake_modules": sorted(m for m in sys.modules if m.split(".")[0] == "snakemake"),
    "parent_main_rerun": getattr(sys.modules.get("__mp_main__"), "__file__", None),
    "by_name": [job.input.images, list(job.input.truth), job.params.spec, job.wildcards.split],
    "by_position": [job.input[0], job.input[2], job.output[0]],
    "types": sorted({type(x).__name__ for x in [*job.input, *job.output, *job.log]}),
    "threads": job.threads,
    "mapping": [dict(job.output), job.input.get("truth"), job.input.get("absent", "default"),
                job.wildcards["split"], list(job.params.keys())],
}
print("to the log")
with open(job.output.result, "w") as handle:
    json.dump(result, handle)
"""

# The parent runs as a script file, as Snakemake's console script does: multiprocessing would run a
# main *file* again in every child (a `python -m` main is left alone).
PARENT_SCRIPT = """
import sys
from snakemake.iocontainers import InputFiles, Log, OutputFiles, Params, Wildcards
from diffattr.worker import run_script
sys.path.insert(0, {tests!r})
from test_worker import named

if __name__ == "__main__":
    run_script({job!r},
               named(InputFiles, {{"images": "a.zarr", "truth": ["t0.zarr", "t1.zarr"]}}),
               named(OutputFiles, {{"result": {out!r}}}),
               named(Params, {{"spec": {{"k": [1, 2]}}}}),
               named(Wildcards, {{"split": "val"}}), 1, named(Log, {{"log": {log!r}}}))
"""


def named(cls, items: dict):
    """A Snakemake named list, built as Snakemake builds a rule's input."""
    flat, spans = [], {}
    for name, value in items.items():
        values = value if isinstance(value, list) else [value]
        spans[name] = (len(flat), len(flat) + len(values) if isinstance(value, list) else None)
        flat.extend(values)
    container = cls(flat)
    for name, (start, end) in spans.items():
        container._set_name(name, start, end)
    return container


def test_script_sees_plain_values_and_no_snakemake(tmp_path):
    job, parent = tmp_path / "job.py", tmp_path / "parent.py"
    out, log = tmp_path / "result.json", tmp_path / "job.log"
    job.write_text(JOB_SCRIPT)
    parent.write_text(PARENT_SCRIPT.format(tests=str(Path(__file__).parent),
                                           job=str(job), out=str(out), log=str(log)))
    subprocess.run([sys.executable, str(parent)], check=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["snakemake_modules"] == []
    assert result["parent_main_rerun"] is None
    assert result["by_name"] == ["a.zarr", ["t0.zarr", "t1.zarr"], {"k": [1, 2]}, "val"]
    assert result["by_position"] == ["a.zarr", "t1.zarr", str(out)]
    assert result["types"] == ["str"]
    assert result["threads"] == 1
    assert result["mapping"] == [{"result": str(out)}, ["t0.zarr", "t1.zarr"], "default", "val", ["spec"]]
    assert log.read_text() == "to the log\n"


def test_failing_script_raises_and_names_its_log(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit(3)\n")
    log = tmp_path / "job.log"
    with pytest.raises(RuntimeError, match=r"fails.py exited with code 3; see .*job.log"):
        run_script(script, InputFiles([]), OutputFiles([]), Params([]), Wildcards([]), 1,
                   named(Log, {"log": str(log)}))


def test_jobs_started_side_by_side_all_report_success(tmp_path):
    """Snakemake runs jobs in threads: each thread's start polls the other threads' children, and a
    child's exit code can be read only once, so an unguarded poll made successful jobs report 255
    (about 1 in 40 here before the fix)."""
    script = tmp_path / "short.py"
    script.write_text("import time\ntime.sleep(0.001)\n")
    failures = []

    def jobs():
        for _ in range(30):
            try:
                run_script(script, [], [], [], {}, 1, [])
            except RuntimeError as error:
                failures.append(str(error))

    threads = [threading.Thread(target=jobs) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


THREADS_SCRIPT = """
import json, os
import numpy, torch
from threadpoolctl import threadpool_info
with open(snakemake.output[0], "w") as handle:
    json.dump({"torch": torch.get_num_threads(), "blas": [p["num_threads"] for p in threadpool_info()],
               "env": os.environ["OPENBLAS_NUM_THREADS"]}, handle)
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_a_job_computes_on_its_rules_threads(tmp_path, threads):
    """torch and every BLAS / OpenMP pool loaded in the job use the rule's `threads`, whatever the
    machine has (this one's BLAS would take every core)."""
    script, out = tmp_path / "threads.py", tmp_path / "threads.json"
    script.write_text(THREADS_SCRIPT)
    run_script(script, [], [str(out)], [], {}, threads, [])
    result = json.loads(out.read_text())
    assert result["torch"] == threads and result["env"] == str(threads)
    assert result["blas"] and set(result["blas"]) == {threads}
