"""training/run_timed.py (several trainings within a wall-clock budget) and the sweep spec behind the shipped x4 models.

The timed runner is tested with a stand-in training script that advances a tqdm bar at a fixed rate, as the
trainer's does, and records the ``train.max_steps`` it was given: the probe must measure that rate and the second
phase must schedule what fits in the rest of the budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from sr_diffusion.training import build_regression_model
from sr_diffusion.training.config import load_config
from sr_diffusion.training.resshift import ResShiftExperimentConfig, build_resshift_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
import run_timed  # noqa: E402

FAKE_TRAINER = """
import json, sys, time
from pathlib import Path
from tqdm import tqdm
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
steps, out, rate = int(args["train.max_steps"]), Path(args["train.output_dir"]), float(args["fake.rate"])
bar = tqdm(total=steps, desc="steps", mininterval=0, miniters=1)
for _ in range(steps):
    time.sleep(1 / rate)
    bar.update(1)
bar.close()
(out / "done.json").write_text(json.dumps({"steps": steps, "argv": sys.argv[1:]}))
"""


def test_probe_then_train_within_the_budget(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINER)
    spec = {
        "runs": {
            "fast": {"script": str(script), "config": "x.yaml", "overrides": ["fake.rate=40"]},
            "slow": {"script": str(script), "config": "x.yaml", "overrides": ["fake.rate=10"], "threads": 1},
        }
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    args = [
        "--spec",
        str(spec_path),
        "--budget",
        "12",  # generous for a loaded CI machine: a slow interpreter start only shortens the second phase
        "--probe",
        "4",
        "--safety",
        "0.8",
        "--reserve",
        "0.5",
        "--out",
        str(out),
    ]
    assert run_timed.main([*args, "--extra", "validation.source=none"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert set(summary) == {"fast", "slow"}
    # sleeps only lengthen a step, so a measured rate is at most the nominal one (and the window ends on a step); the
    # lower bounds allow a heavily loaded machine (a third of the nominal rate)
    assert 13 < summary["fast"]["probe_rate"] <= 41 and 3 < summary["slow"]["probe_rate"] <= 10.5
    for name in ("fast", "slow"):
        s = summary[name]
        assert s["returncode"] == 0 and s["max_steps"] >= 4
        done = json.loads((out / "train" / name / "done.json").read_text())
        assert done["steps"] == s["max_steps"] and "validation.source=none" in done["argv"]
    assert summary["fast"]["max_steps"] > 2 * summary["slow"]["max_steps"]
    assert (out / "probe" / "fast" / "log.txt").read_text().count("steps:") > 10


def test_unknown_run_names_are_refused(tmp_path, capsys):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"runs": {"a": {"script": "s.py", "config": "c.yaml"}}}))
    with pytest.raises(SystemExit) as exc:
        run_timed.main(["--spec", str(spec_path), "--budget", "1", "--out", str(tmp_path), "--only", "b"])
    assert exc.value.code == 2 and "unknown runs ['b']" in capsys.readouterr().err


def test_the_issue12_sweep_spec_builds_every_model():
    """Each run of the sweep is its config plus overrides: they must parse and build, with the documented changes."""
    spec = yaml.safe_load((REPO / "configs/sweeps/issue12_x4.yaml").read_text())["runs"]
    built = {}
    for name, run in spec.items():
        assert (REPO / run["script"]).is_file()
        if run["script"].endswith("train_regression.py"):
            config = load_config(REPO / run["config"], run.get("overrides", []))
            model = build_regression_model(config)
        else:
            config = load_config(REPO / run["config"], run.get("overrides", []), cls=ResShiftExperimentConfig)
            model = build_resshift_model(config)
        built[name] = model.config
    assert built["reg_ps32"].upsampler == "pixelshuffle" and built["reg_ps32"].num_feat == 32
    assert built["reg_icnr32"].upsample_init == "icnr"
    assert built["reg_nc48"].upsampler == "nearest_conv" and built["reg_nc48"].num_feat == 48
    assert built["reg_nc64"].num_feat == 64 and built["reg_nc64"].num_block == 16  # the shipped config
    assert built["gen_ps"].upsampler == "pixelshuffle" and not built["gen_ps"].lq_residual
    assert built["gen_nc"].upsampler == "nearest_conv" and built["gen_nc"].lq_residual


def test_the_issue12_bilinear_cpu_spec_builds_and_fine_tunes_from_the_shipped_weights():
    """The CPU fine-tune runs: bilinear + conv versions of the shipped configs, started from a saved model folder
    with the same parameters (train.init_from)."""
    from sr_diffusion.training.trainer import load_initial_weights

    spec = yaml.safe_load((REPO / "configs/sweeps/issue12_bilinear_cpu.yaml").read_text())["runs"]
    for name, run in spec.items():
        cls = None if run["script"].endswith("train_regression.py") else ResShiftExperimentConfig
        config = load_config(REPO / run["config"], run.get("overrides", []), **({"cls": cls} if cls else {}))
        model = build_regression_model(config) if cls is None else build_resshift_model(config)
        assert model.config.upsampler == "bilinear_conv", name
        assert (REPO / config.train.init_from / "config.json").is_file(), name
        load_initial_weights(model, REPO / config.train.init_from)  # same parameters, whichever upsampler was saved
