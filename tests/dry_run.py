"""Reading Snakemake's dry-run output, shared by the workflow and SLURM tests."""
import re


def job_counts(stdout: str) -> dict[str, int]:
    """Rule -> job count of a dry run's 'Job stats' table ({} when there is nothing to do)."""
    stats = stdout.split("Job stats:")[1].split("Reasons:")[0] if "Job stats:" in stdout else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)
            if m.group(1) != "total"}
