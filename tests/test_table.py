"""The experiment's table and report, with rows of methods without lambda or without features."""
import pandas as pd

from diffattr.table import COLUMNS, collect


def rows(method, function, K, k, lam, lds, checkpoint=None, tags=None):
    return [{"method": method, "function": function, "timesteps": K, "proj_dim": k, "checkpoint": checkpoint,
             "tags": tags, "split": split,
             "lambda_rule": rule, "lambda": lam, "lds": lds, "ci_low": lds - 0.1, "ci_high": lds + 0.1,
             "n_queries": 5, "n_subsets": 8} for split in ("val", "gen") for rule in ("oracle", "heldout")]


def test_table_and_report_with_baselines(tmp_path):
    parts = {
        "simple_K4_k64": rows("TRAK", "simple", 4, 64, 2000.0, 0.2) + rows("Gradient (dot)", "simple", 4, 64,
                                                                           None, 0.05),
        "pixel_cos": rows("Raw pixel (cos)", None, None, None, None, -0.03),
        "simple_K10_k64": rows("TRAK", "simple", 10, 64, 500.0, 0.3),
        "simple_K4_k64_cumulative_e2": rows("TRAK", "simple", 4, 64, 200.0, 0.4, tags="cumulative_e2"),
    }
    paths = []
    for name, part in parts.items():
        paths.append(tmp_path / f"{name}.csv")
        pd.DataFrame(part).to_csv(paths[-1], index=False)
    table = collect(paths, "demo", tmp_path / "lds.csv", tmp_path / "lds.md")
    written = pd.read_csv(tmp_path / "lds.csv")
    assert list(written.columns) == COLUMNS and len(written) == 20
    assert list(written.method[:3]) == ["Gradient (dot)", "Raw pixel (cos)", "TRAK"]  # gen, heldout first
    pixel = written[written.method == "Raw pixel (cos)"]
    assert pixel[["function", "timesteps", "proj_dim", "lambda"]].isna().all().all()
    assert list(written.timesteps[written.method == "TRAK"][:3]) == [4, 4, 10]
    assert written.tags[written.method == "TRAK"][:3].astype(object).fillna("").tolist() == ["", "cumulative_e2", ""]
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    report = (tmp_path / "lds.md").read_text().splitlines()
    lines = [line for line in report if line.startswith("| ") and "---" not in line]
    body = {line.split(" | ")[0]: line for line in lines[::-1]}  # the first line of each method
    assert body["| Raw pixel (cos)"].startswith("| Raw pixel (cos) |  |  |  |  |  | -3.00 [-13.00, 7.00] |")
    assert "lambda" not in body["| Raw pixel (cos)"] and "nan" not in "\n".join(report)
    assert "20.00 [10.00, 30.00] (lambda 2000)" in body["| TRAK"]
    assert body["| TRAK"].startswith("| TRAK | simple | 4 | 64 |  |  |")
    # a tagged feature set is a row of its own, after the untagged one; K in numeric order: 4, then 10
    assert lines[-2].startswith("| TRAK | simple | 4 | 64 |  | cumulative_e2 | 40.00")
    assert lines[-1].startswith("| TRAK | simple | 10 | 64 |  |  | 30.00")


def test_checkpoint_rows(tmp_path):
    """Features of the final weights first, then of kept checkpoints by step (numeric: 150 before
    1000), then TracInCP's sum over checkpoints; the checkpoint column is text, empty for the final."""
    parts = {
        "simple_K10_k64_step1000": rows("TRAK", "simple", 10, 64, 1.0, 0.4, 1000),
        "simple_K10_k64_step150": rows("TRAK", "simple", 10, 64, 1.0, 0.3, 150),
        "simple_K10_k64": rows("TRAK", "simple", 10, 64, 1.0, 0.2),
        "simple_K10_k64_tracin": rows("TracInCP", "simple", 10, 64, None, 0.1, "150+1000+final"),
    }
    paths = []
    for name, part in parts.items():
        paths.append(tmp_path / f"{name}.csv")
        pd.DataFrame(part).to_csv(paths[-1], index=False)
    table = collect(paths, "demo", tmp_path / "lds.csv", tmp_path / "lds.md")
    val = table[(table.split == "val") & (table.lambda_rule == "oracle")]
    assert list(val.checkpoint.fillna("")) == ["", "150", "1000", "150+1000+final"]
    assert list(val.lds) == [0.2, 0.3, 0.4, 0.1]
    written = pd.read_csv(tmp_path / "lds.csv", dtype={"checkpoint": str}, keep_default_na=False)
    assert list(written.checkpoint[:4]) == ["", "150", "1000", "150+1000+final"]  # gen, heldout first
    report = (tmp_path / "lds.md").read_text()
    assert "| TRAK | simple | 10 | 64 | 150 |  | 30.00" in report
    assert "| TracInCP | simple | 10 | 64 | 150+1000+final |  | 10.00" in report


def test_method_of_one_split_leaves_the_other_splits_cells_blank(tmp_path):
    """Journey-TRAK exists for generated queries only: its val cells are empty, not 'nan'."""
    both = rows("TRAK", "simple", 4, 64, 100.0, 0.2)
    gen_only = [row for row in rows("Journey-TRAK", "simple", 4, 64, 50.0, 0.1) if row["split"] == "gen"]
    path = tmp_path / "simple.csv"
    pd.DataFrame(both + gen_only).to_csv(path, index=False)
    table = collect([path], "demo", tmp_path / "lds.csv", tmp_path / "lds.md")
    assert len(table) == 6 and set(table.split[table.method == "Journey-TRAK"]) == {"gen"}
    report = (tmp_path / "lds.md").read_text()
    assert "nan" not in report
    header = next(line for line in report.splitlines() if line.startswith("| method"))
    assert header.endswith("| gen, heldout | gen, oracle | val, heldout | val, oracle |")
    journey = next(line for line in report.splitlines() if line.startswith("| Journey-TRAK"))
    assert journey.startswith("| Journey-TRAK | simple | 4 | 64 |  |  | 10.00 [0.00, 20.00] (lambda 50) | 10.00")
    assert journey.endswith("(lambda 50) |  |  |")
