"""The package as users install it: README commands, CI entry point, import cost, wheel layout."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [line for block in blocks[:2] for line in block.strip().splitlines()]


def test_readme_has_exactly_two_quickstart_commands_and_ci_runs_the_test_one():
    main_job, test_cmd = readme_commands()
    assert "sr-diffusion demo" in main_job and "python3 -m venv" in main_job
    assert "pytest" in test_cmd and "python3 -m venv" in test_cmd
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, ".ci/run must run the README's test command verbatim"


def test_import_is_light():
    code = (
        "import sys, sr_diffusion, sr_diffusion.image_processor, sr_diffusion.metrics, sr_diffusion.resize; "
        "heavy = ('diffusers', 'accelerate', 'transformers', 'peft', 'open_clip', 'tensorboard', 'skimage', "
        "'sr_diffusion.training'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_wheel_installs_pipelines_as_a_subpackage_and_ships_data(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("sr_diffusion-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sr_diffusion/pipelines/__init__.py" in names
    assert "sr_diffusion/pipelines/regression/pipeline_regression.py" in names
    assert "sr_diffusion/data/sample_lr.png" in names
    assert not any(n.startswith("pipelines/") for n in names)
    # every file of every shipped model (generative and regression defaults, degradation estimator)
    shipped = [p for p in (REPO / "sr_diffusion" / "weights").rglob("*") if p.suffix in (".json", ".safetensors")]
    assert {"regression_x4", "resshift_x4", "degradation_estimator"} <= {p.relative_to(REPO).parts[2] for p in shipped}
    missing = sorted(str(p.relative_to(REPO)) for p in shipped if str(p.relative_to(REPO)) not in names)
    assert not missing, f"not in the wheel: {missing}"
