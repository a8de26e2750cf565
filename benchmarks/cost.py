"""Device-hours of a preset's whole plan, per rule and in total: the planner's jobs times the work of
each job (diffattr.cost) divided by throughputs, either stored (a JSON file of benchmarks/throughputs/,
measured on a device for one preset's model) or measured now on the machine in hand.

    PYTHONPATH=src python benchmarks/cost.py cifar2                       # stored H200 numbers
    PYTHONPATH=src python benchmarks/cost.py cifar2-mini --measure        # measured here, now
    PYTHONPATH=src python benchmarks/cost.py cifar2 --throughputs FILE
    PYTHONPATH=src python benchmarks/cost.py artbench2                    # work only: no throughputs of its model
    PYTHONPATH=src python benchmarks/cost.py cifar2-fast --set train.compile=true --set featurize.dtype=tf32
                                                                          # priced with settings changed
    PYTHONPATH=src python benchmarks/cost.py cifar2-fast --set train.compile=true --rate compilation_cached=0.1
                                                                          # a throughput supposed (units/s)

Compiled trainings (train.compile) share one inductor cache (config.yaml's compile_cache): the
first job of each training unit pays `compilation`, the others `compilation_cached`; where that is
not measured it is priced as `compilation` (said below the table). `--cold-compilations`: every job
compiles from an empty cache (compile_cache null on a cluster whose jobs see no common /tmp).

Host rules (scoring, LDS, tables, CLIP embeddings) run on CPUs and are counted, not timed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffattr.cost import UNITS, plan_cost
from diffattr.plan import Plan
from diffattr.settings import ConfigError
from presets import parse_overrides, preset_settings

STORED = Path(__file__).resolve().parent / "throughputs" / "h200_cifar2.json"


def stored_throughputs(path: Path, preset: str, settings: dict) -> tuple[dict, str]:
    """The file's throughputs and a line naming their origin; none, and a line saying why, when they
    were measured on another model or training batch than the preset's (the work is still tabled)."""
    record = json.loads(path.read_text())
    measured = preset_settings(record["model_preset"])
    for key in ("model", "train"):
        mine = settings[key] if key == "model" else settings[key]["batch_size"]
        theirs = measured[key] if key == "model" else measured[key]["batch_size"]
        if mine != theirs:
            return {}, (f"no measured throughputs: {path.name} was measured on preset {record['model_preset']!r}, "
                        f"whose {key} {'block' if key == 'model' else 'batch_size'} differs from {preset!r}'s; "
                        f"measure this preset's with --measure (on the device in question)")
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    return record["throughputs"], f"{record['device']}, stored {record['date']} ({versions}; {path.name})"


def measured_throughputs(settings: dict, device: str) -> tuple[dict, str]:
    import torch

    from diffattr.device import device_name, resolve_device
    from stage_throughput import unit_throughputs
    where = resolve_device(device)
    return (unit_throughputs(settings, where, steps=10, gt_images=64),
            f"{device_name(where)}, measured now (torch {torch.__version__})")


def table(preset: str, rows, origin: str, throughputs: dict, notes=()) -> str:
    """Every device rule's work; hours and share for those whose units all have a throughput (first,
    longest first), the others' hours left blank and named below."""
    timed = [r for r in rows if r.seconds is not None]
    total = sum(r.seconds for r in timed)
    title = f"device-hours on {origin}" if throughputs else f"work per rule; {origin}"
    lines = [f"# {preset}: {title}", "",
             "| rule | jobs | work (units) | device-hours | per job (h) | share |", "|---|---|---|---|---|---|"]
    untimed = [r for r in rows if r.work is not None and r.seconds is None]
    for r in [*sorted(timed, key=lambda r: -r.seconds), *untimed]:
        work = ", ".join(f"{amount:.3g} {unit}" for unit, amount in r.work.items())
        hours = (f"{r.seconds / 3600:.3g} | {r.seconds / 3600 / r.jobs:.3g} | {r.seconds / total:.1%}"
                 if r.seconds is not None else "| |")
        lines.append(f"| {r.rule} | {r.jobs} | {work} | {hours} |")
    lines.append(f"| **total** | {sum(r.jobs for r in timed)} | | **{total / 3600:.4g}** | | 100% |")
    host = [r for r in rows if r.modelled and r.work is None]
    missing = untimed
    unmodelled = [r for r in rows if not r.modelled]
    lines += ["", "Host (CPU) rules, not in the total: " + ", ".join(f"{r.rule} ({r.jobs})" for r in host)]
    if missing:
        lines.append("No throughput for their units (not in the total): " + ", ".join(
            f"{r.rule} ({', '.join(u for u in r.work if u not in throughputs)})" for r in missing))
    if unmodelled:
        lines.append("Work not modelled (diffattr.cost.Work.job; not in the total): "
                     + ", ".join(f"{r.rule} ({r.jobs})" for r in unmodelled))
    lines.append("Throughputs (units/s): " + (", ".join(f"{u} {v:.4g}" for u, v in throughputs.items()) or "none"))
    return "\n".join([*lines, *notes])


def supposed_rates(assignments: list[str]) -> dict[str, float]:
    """`UNIT=VALUE` strings (units/s) as {unit: rate}; one line naming a bad one."""
    rates = {}
    for assignment in assignments:
        unit, _, value = assignment.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = 0.0
        if unit not in UNITS or not rate > 0:
            raise SystemExit(f"--rate {assignment}: expected UNIT=UNITS_PER_SECOND, a positive number for one of "
                             f"diffattr.cost.UNITS (e.g. compilation_cached=0.1)")
        rates[unit] = rate
    return rates


def with_cached_compilation(throughputs: dict) -> tuple[dict, list[str]]:
    """`compilation_cached` priced as a cold `compilation` where only that is known (an upper bound)."""
    if "compilation" not in throughputs or "compilation_cached" in throughputs:
        return throughputs, []
    return ({**throughputs, "compilation_cached": throughputs["compilation"]},
            ["compilation_cached: not measured on this device; priced as a cold compilation (an upper bound; "
             "benchmarks/bench_compile_cache.py measures it)"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--throughputs", type=Path, default=STORED, help="a stored measurement (JSON)")
    parser.add_argument("--measure", action="store_true", help="measure throughputs here and now")
    parser.add_argument("--device", default="auto", help="with --measure: auto, cpu, cuda or cuda:N")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting changed (a YAML value) before pricing, e.g. train.dtype=bf16; repeatable")
    parser.add_argument("--rate", action="append", default=[], metavar="UNIT=VALUE",
                        help="a throughput supposed (units/s), over the stored or measured one; repeatable")
    parser.add_argument("--cold-compilations", action="store_true",
                        help="every compiled training compiles from an empty cache (no shared compile_cache)")
    args = parser.parse_args(argv)
    try:
        settings = preset_settings(args.preset, parse_overrides(args.set))
    except ConfigError as error:  # one line per fault, no traceback
        raise SystemExit(str(error)) from None
    supposed = supposed_rates(args.rate)
    throughputs, origin = (measured_throughputs(settings, args.device) if args.measure
                           else stored_throughputs(args.throughputs, args.preset, settings))
    throughputs = {**throughputs, **supposed}  # with no measurement applying, the supposed rates alone
    origin += "".join(f"; {unit} supposed {rate:.4g}/s" for unit, rate in supposed.items())
    throughputs, notes = with_cached_compilation(throughputs)
    name = " ".join([args.preset, *args.set, *(["--cold-compilations"] if args.cold_compilations else [])])
    rows = plan_cost(Plan(args.preset, settings), throughputs, shared_cache=not args.cold_compilations)
    print(table(name, rows, origin, throughputs, notes))


if __name__ == "__main__":
    main()
