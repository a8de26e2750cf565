"""Helpers shared by the tests that run Snakemake: a copy of the workflow, the dry-run job table."""
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_workflow(root: Path) -> Path:
    """The workflow's files (not results/ or logs/) copied into `root`."""
    for name in ("Snakefile", "config.yaml", "rules", "workflow", "profiles"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / name)
    return root


def job_counts(stdout: str) -> dict[str, int]:
    """Rule -> job count of a dry run's 'Job stats' table ({} when there is nothing to do)."""
    stats = stdout.split("Job stats:")[1].split("Reasons:")[0] if "Job stats:" in stdout else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)
            if m.group(1) != "total"}
