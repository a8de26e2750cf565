"""The cost model (diffattr.cost, benchmarks/cost.py): the work of each job against counts written out
from the settings, every rule of every preset accounted for, and the hours from work and throughputs."""
import json
import math
import re
import sys
from collections import Counter

import pytest
import torch
import yaml

from diffattr.cost import HOST_RULES, UNITS, Work, fields, plan_cost
from diffattr.plan import PATHS, Plan, path
from diffattr.settings import experiment

from dry_run import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import cost  # noqa: E402
import stage_throughput  # noqa: E402

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def plan(preset: str) -> Plan:
    return Plan(preset, experiment(CONFIG, preset, libraries=False))


def test_fields_invert_path():
    values = {"experiment": "cifar2-mini", "split": "val", "family": "lds", "model": "retrain/s003-r1",
              "fset": "square_K10_k512_e2", "root": "results/x/truth_l2", "scores": "simple_K10_k512_tracin",
              "qsplit": "gen", "function": "simple", "k": "512", "ablation": "eta", "ext": "csv",
              "figure": "gallery_val", "istore": "influence_elbo_K10_k512", "removal": "trak_n100", "target": "7"}
    for kind, template in PATHS.items():
        wanted = {key: value for key, value in values.items() if "{" + key + "}" in template}
        if kind != "ground_truth" and "model" in wanted:  # a pool model's folder is its bare name
            wanted["model"] = "s003-r1"
        assert fields(kind, path(kind, **wanted)) == wanted
    with pytest.raises(ValueError, match="is not a features path"):
        fields("features", "results/default/scores/a/val.zarr")


def test_default_work_written_out():
    """default: 72 LDS models of 150 steps; ground truth of 100 val + 100 gen queries x 20 timesteps x
    1 noise per model; square with 2 noises at K 10, k 512 on the 400 train images; 100 images x 50
    DDIM steps; Journey-TRAK: the 100 generated images' 50 trajectory steps, projected to 512."""
    p = plan("default")
    totals = {row.rule: row.work for row in plan_cost(p, {})}
    assert totals["train_lds"] == Counter(train_step_fp32=72 * 150)
    assert totals["train_full"] == Counter(train_step_fp32=600)
    assert totals["ground_truth"] == Counter(eval_fp32=72 * 200 * 20)
    assert totals["generate"] == Counter(ddim_step_fp32=100 * 50)
    assert totals["featurize_journey"] == Counter(ddim_step_fp32=100 * 50, gradient=100 * 50, projection=100 * 512)
    store = path("features", experiment="default", fset="square_K10_k512_e2", split="train")
    assert Work(p).job("featurize", store) == Counter(gradient=400 * 10 * 2, projection=400 * 512)
    assert totals["score"] is None and totals["table"] is None  # host rules


def totals_with(preset: str, shared_cache: bool = True, **sections) -> dict:
    """Each rule's summed work for `preset` with `sections` ({section: {key: value}}) set on top."""
    settings = experiment(CONFIG, preset, libraries=False)
    for section, values in sections.items():
        settings[section] = {**settings[section], **values}
    return {row.rule: row.work for row in plan_cost(Plan(preset, settings), {}, shared_cache)}


def test_tf32_featurization_is_priced_in_gradient_tf32():
    """featurize.dtype tf32: the featurize, Journey-TRAK and influence-feature jobs' gradients in
    gradient_tf32, the same counts as fp32's `gradient`; K-FAC's curvature stays fp32. fp32 set
    explicitly is the default's pricing."""
    default = totals_with("default")
    fp32, tf32 = (totals_with("default", featurize={"dtype": dtype}) for dtype in ("fp32", "tf32"))
    assert fp32 == default
    for rule in ("featurize", "featurize_journey", "influence_features"):
        assert "gradient" in default[rule] and "gradient_tf32" not in default[rule]
        assert tf32[rule] == Counter({("gradient_tf32" if unit == "gradient" else unit): amount
                                      for unit, amount in default[rule].items()})
    assert tf32["curvature"] == default["curvature"] == Counter(gradient=default["curvature"]["gradient"])


def test_training_is_priced_in_its_precision_and_speed_option():
    """train.dtype and train.compile / train.channels_last name the unit of every training job
    (train_step_<dtype>[_compiled|_cl]), with the steps unchanged; a compiled job also pays one
    compilation: with a shared cache the first job a cold one and the other 72 a cached one, without
    it each a cold one."""
    plain = totals_with("default")
    jobs = {"train_full": 1, "train_lds": 72}
    for train, unit in (({"dtype": "bf16", "compile": True}, "train_step_bf16_compiled"),
                        ({"channels_last": True}, "train_step_fp32_cl"),
                        ({"dtype": "tf32", "compile": False}, "train_step_tf32")):
        for shared in (True, False):
            priced = totals_with("default", shared, train=train)
            compilations = Counter()
            for rule in jobs:
                steps = priced[rule].pop(unit)
                assert steps == plain[rule]["train_step_fp32"]
                compilations += priced[rule]
            if not train.get("compile"):
                assert compilations == Counter()
            else:
                assert compilations == (Counter(compilation=1, compilation_cached=72) if shared
                                        else Counter(compilation=73))
            assert priced["ground_truth"] == plain["ground_truth"]


def test_factorized_projection_is_priced_per_noised_copy():
    """featurize.projector factorized: the featurize and Journey-TRAK jobs' work is one `factorized`
    (or `factorized_tf32`) unit per noised copy, the gradients and projection it replaces gone; the
    K-FAC influence features keep their dense projection. Its norm split adds to each job the
    gradients of 32 train images at 10 timesteps that measure it."""
    dense = totals_with("default")
    for dtype, unit, gradient in (("fp32", "factorized", "gradient"), ("tf32", "factorized_tf32", "gradient_tf32")):
        fact = totals_with("default", featurize={"projector": "factorized", "dtype": dtype, "factor_split": "even"})
        assert fact["featurize"] == Counter({unit: dense["featurize"]["gradient"]})
        assert fact["featurize_journey"] == Counter(ddim_step_fp32=100 * 50, **{unit: 100 * 50})
        assert fact["influence_features"] == Counter({gradient: dense["influence_features"]["gradient"],
                                                      "projection": dense["influence_features"]["projection"]})
    store = path("features", experiment="default", fset="square_K10_k512_e2", split="train")
    settings = experiment(CONFIG, "default", libraries=False)
    settings["featurize"]["projector"] = "factorized"
    assert "factor_split" not in settings["featurize"]  # norm when absent
    work = Work(Plan("default", settings))
    assert work.job("featurize", store) == Counter(factorized=400 * 10 * 2, gradient=32 * 10)
    journey = path("journey", experiment="default", function="square", k=512)
    assert work.job("featurize_journey", journey) == Counter(ddim_step_fp32=100 * 50, factorized=100 * 50,
                                                             gradient=32 * 10)
    settings["featurize"]["factor_split"] = "even"
    assert Work(Plan("default", settings)).job("featurize", store) == Counter(factorized=400 * 10 * 2)


def test_pool_models_ground_truth_uses_the_retrain_budget():
    """cifar2: a pool model's outputs are its 2000 queries at retrain.timesteps (1000) x 1 noise;
    an LDS model's the ground truth's 1000 timesteps x 3 noises."""
    work = Work(plan("cifar2"))
    lds = path("ground_truth", root="results/cifar2", model="s000-r0")
    pool = path("ground_truth", root="results/cifar2", model="retrain/s000-r0")
    assert work.job("ground_truth", lds) == Counter(eval_fp32=2000 * 1000 * 3)
    assert work.job("ground_truth", pool) == Counter(eval_fp32=2000 * 1000 * 1)


@pytest.mark.parametrize("preset", sorted(CONFIG["experiments"]))
def test_every_rule_of_every_preset_is_accounted_for(preset):
    """A rule the planner gains must have its work named here or be a host rule; units are known."""
    p = plan(preset)
    for rule, outputs in p.jobs().items():
        for output in outputs:
            work = Work(p).job(rule, output)  # KeyError: a device rule whose work is not modelled
            assert (work is None) == (rule in HOST_RULES)
            assert work is None or (set(work) <= set(UNITS) and all(v > 0 for v in work.values()))


def test_hours_are_work_over_throughput():
    p = plan("default")
    rows = {row.rule: row for row in plan_cost(p, {unit: 2.0 for unit in UNITS})}
    assert rows["train_lds"].seconds == 72 * 150 / 2.0
    assert math.isclose(rows["featurize_journey"].seconds, (100 * 50 * 2 + 100 * 512) / 2.0)
    partial = {row.rule: row for row in plan_cost(p, {"train_step_fp32": 1.0})}
    assert partial["train_lds"].seconds == 72 * 150 and partial["ground_truth"].seconds is None


def test_stored_throughputs_apply_to_their_model_only(capsys):
    settings = experiment(CONFIG, "cifar2", libraries=False)
    throughputs, origin = cost.stored_throughputs(cost.STORED, "cifar2", settings)
    assert set(throughputs) <= set(UNITS) and "H200" in origin
    cost.main(["cifar2"])
    out = capsys.readouterr().out
    assert "| ground_truth | 704 |" in out and "| **total** |" in out
    throughputs, origin = cost.stored_throughputs(cost.STORED, "default", experiment(CONFIG, "default", libraries=False))
    assert throughputs == {} and "model block differs from 'default'" in origin


def test_cached_compilation_is_priced_cold_until_measured_or_supposed(capsys):
    """cost.py with compiled training: the stored H200 file has no compilation_cached, so the 704 cached
    compilations cost what cold ones do (and a line says so); a supposed rate (--rate) prices them, and
    --cold-compilations prices every job's compilation cold; a bad --rate gets one line."""
    compiled = ["cifar2", "--set", "train.compile=true"]

    def hours(args):
        cost.main(args)
        out = capsys.readouterr().out
        return float(re.search(r"\| \*\*total\*\* \| \d+ \| \| \*\*([\d.]+)\*\*", out).group(1)), out

    stored = json.loads(cost.STORED.read_text())["throughputs"]
    assert "compilation_cached" not in stored
    upper, out = hours(compiled)
    assert "compilation_cached: not measured on this device; priced as a cold compilation" in out
    assert "| train_retrain | 512 | 2.05e+06 train_step_fp32_compiled, 512 compilation_cached |" in out
    cold, out = hours([*compiled, "--cold-compilations"])
    assert cold == upper and "| train_retrain | 512 | 2.05e+06 train_step_fp32_compiled, 512 compilation |" in out
    supposed = 10 * stored["compilation"]  # a tenth of a cold compilation's seconds
    cheaper, out = hours([*compiled, "--rate", f"compilation_cached={supposed}"])
    assert "not measured on this device" not in out and "compilation_cached supposed" in out
    saved = (512 + 192) * (1 / stored["compilation"] - 1 / supposed) / 3600  # every job but the first
    assert math.isclose(upper - cheaper, saved, abs_tol=0.1)  # totals printed to 4 digits
    with pytest.raises(SystemExit, match=r"^--rate compilation=fast: expected UNIT=UNITS_PER_SECOND"):
        cost.main([*compiled, "--rate", "compilation=fast"])


def test_measured_units_are_the_cost_models_units():
    """stage_throughput measures each unit the cost model counts (on the CPU: fp32 only), at tiny size."""
    settings = experiment(CONFIG, "tiny", libraries=False)
    rates = stage_throughput.unit_throughputs(settings, torch.device("cpu"), steps=2, gt_images=4,
                                              feature_batch=2, proj_dim=8)
    assert set(rates) == {"train_step_fp32", "eval_fp32", "gradient", "factorized", "projection", "ddim_step_fp32"}
    assert set(rates) <= set(UNITS)
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())


def test_latent_work_written_out():
    """artbench2: the 5000 train and 1000 val images encoded, the train split's mirror images too, the
    1000 generated latents decoded, 1 + 192 LoRA trainings of 7813 and 3907 steps; sd-digits also
    trains its embedded base (model.base's VAE and UNet steps)."""
    totals = {row.rule: row.work for row in plan_cost(plan("artbench2"), {})}
    assert totals["encode"] == Counter(vae_encode=5000 + 1000)
    assert totals["encode_flipped"] == Counter(vae_encode=5000)
    assert totals["decode_generated"] == Counter(vae_decode=1000)
    assert totals["train_full"] == Counter(train_step_fp16=7813) and totals["train_lds"] == Counter(train_step_fp16=192 * 3907)
    assert totals["ground_truth"] == Counter(eval_fp32=192 * 2000 * 1000 * 3)
    assert "base" not in totals
    base = plan("sd-digits").settings["model"]["base"]
    assert {row.rule: row.work for row in plan_cost(plan("sd-digits"), {})}["base"] == Counter(
        base_vae_step=base["vae_train"]["steps"], base_unet_step=base["unet_train"]["steps"])


def test_a_preset_without_measured_throughputs_gets_its_work_and_the_missing_units(capsys):
    """benchmarks/cost.py artbench2: no stored throughput applies to miniSD + LoRA, so every device rule
    is listed with its work and no hours, and the units without a throughput are named; a rate
    supposed with --rate prices the rules whose units it covers."""
    cost.main(["artbench2"])
    out = capsys.readouterr().out
    assert "no measured throughputs" in out and "| train_lds | 192 | 7.5e+05 train_step_fp16 | | | |" in out
    assert "encode_flipped (vae_encode)" in out and "decode_generated (vae_decode)" in out
    assert "| **total** | 0 |" in out and "Throughputs (units/s): none" in out
    cost.main(["artbench2", "--rate", "train_step_fp16=25"])  # a supposed rate prices what it covers
    out = capsys.readouterr().out
    assert "no measured throughputs" in out and "train_step_fp16 supposed 25/s" in out
    assert "| train_lds | 192 | 7.5e+05 train_step_fp16 | 8.33 |" in out  # 750000 / 25 s


def test_cifar2_fast_is_cifar2s_table_for_a_thirtieth_of_its_ground_truth():
    """cifar2-fast plans exactly cifar2's jobs (the same table: every method, function, K, k and
    ablation row); its ground truth and pool outputs are 100 timesteps x 1 noise in bf16 and its
    trainings compiled bf16 steps, the first paying a cold compilation and the others a cached one;
    its features TF32 gradients projected by the factorized projection (its norm split measured on 32
    train images at 10 timesteps). So at the stored H200 throughputs (a cached compilation priced as a
    cold one) its ground truth costs under a 50th of cifar2's and the whole plan under an eighth
    (training then dominates)."""
    slow, fast = plan("cifar2"), plan("cifar2-fast")
    renamed = {rule: sorted(o.replace("cifar2-fast", "cifar2") for o in outputs) for rule, outputs in fast.jobs().items()}
    assert renamed == {rule: sorted(outputs) for rule, outputs in slow.jobs().items()}
    work = Work(fast)
    for model in ("s000-r0", "retrain/s000-r0"):
        assert work.job("ground_truth", path("ground_truth", root="results/cifar2-fast", model=model)) == Counter(
            eval_bf16=2000 * 100)
    compilations = []
    for rule in ("train_full", "train_lds", "train_retrain"):
        output = fast.jobs()[rule][0]
        priced = work.job(rule, output)
        compilations += [unit for unit in priced if unit.startswith("compilation")]
        assert priced - Counter(compilation=1, compilation_cached=1) == Counter(
            train_step_bf16_compiled=Work(slow).job(rule, output)["train_step_fp32"])
    assert compilations == ["compilation", "compilation_cached", "compilation_cached"]
    store = path("features", experiment="cifar2-fast", fset="square_K100_k32768", split="val")
    assert work.job("featurize", store) == Counter(factorized_tf32=1000 * 100, gradient_tf32=32 * 10)
    throughputs, _ = cost.with_cached_compilation(cost.stored_throughputs(cost.STORED, "cifar2-fast", fast.settings)[0])
    rows = {name: plan_cost(p, throughputs) for name, p in (("slow", slow), ("fast", fast))}
    assert all(row.seconds is not None for name in rows for row in rows[name] if row.work is not None)
    hours = {name: {row.rule: row.seconds / 3600 for row in rows[name] if row.seconds is not None} for name in rows}
    truth = lambda name: hours[name]["ground_truth"] + hours[name]["ground_truth_other_function"]
    assert truth("fast") < truth("slow") / 50
    assert sum(hours["fast"].values()) < sum(hours["slow"].values()) / 8
