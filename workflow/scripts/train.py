import os

from diffattr.device import resolve_device
from diffattr.train import train_and_save, use_compile_cache

# Tests only: DIFFATTR_FAIL_MODEL=s001-r1 makes that LDS model's training fail (docs/slurm.md).
failing = os.environ.get("DIFFATTR_FAIL_MODEL")
if failing and failing == snakemake.wildcards.get("model"):
    raise RuntimeError(f"DIFFATTR_FAIL_MODEL={failing}: this model's training fails on purpose")

spec = {**snakemake.params.spec, "checkpoint_every": snakemake.config["checkpoint_every"]}
use_compile_cache(spec, snakemake.config.get("compile_cache"))
train_and_save(snakemake.input.images, snakemake.input.get("subsets"), snakemake.params.subset,
               snakemake.params.seed, spec, snakemake.output.weights,
               resolve_device(snakemake.config["device"]), snakemake.output.get("trajectory"),
               snakemake.input.get("flipped"))
