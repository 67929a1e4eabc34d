"""Data-parallel training on two CPU processes (gloo): every method's tiny config and the two default configs train;
2 processes x batch B train bit for bit the weights of 1 process x batch B with 2-step accumulation, and within
float32 rounding those of 1 process x batch 2B (regression, ResShift, SR3, SRDiff, StableSR, PASD, SeeSR); a
SIGKILLed two-process run resumes to the same weights; checkpoints are written once; validation and logging run on
the main process only; every rank holds the same weights and EMA. The accelerate launch configs of
``configs/accelerate/`` parse, and the DDP ones start our trainer (multi_gpu.yaml, and multi_node.yaml brought
down to one machine).

Launches are grouped to pay the start-up of two Python processes once: this file is also the launched script
(``python tests/test_distributed_training.py SPEC.json``, see ``_run_spec``), which trains each run of a spec in
turn, in the same processes, and records each run's outcome per rank.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ACCELERATE_CONFIGS = CONFIGS / "accelerate"
TRAIN = REPO / "training"
DIGESTS_ENV = "SR_DIFFUSION_STATE_DIGESTS"  # sr_diffusion.training.trainer.STATE_DIGESTS_ENV (checked below)


# ----------------------------------------------------------------------------------------------------------------------
# the launched side
# ----------------------------------------------------------------------------------------------------------------------


def _run_spec(spec_path: str) -> None:
    """Train every run of the spec (``{name: {"script", "args", "out"}}``) in order, in this process. Each run's
    outcome is written to ``out/status_rank{r}.json``; its final weights' digests to ``out/digests/``."""
    import runpy

    from accelerate import Accelerator
    from accelerate.state import PartialState

    def end_training_keeping_the_group(self):
        """``Accelerator.end_training`` without destroying the process group, which the next run reuses."""
        for tracker in self.trackers:
            tracker.finish()

    Accelerator.end_training = end_training_keeping_the_group
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    for name, run in spec.items():
        out = Path(run["out"])
        os.environ[DIGESTS_ENV] = str(out / "digests")
        status: dict = {"name": name}
        try:
            main = runpy.run_path(run["script"], run_name=f"spec_{name}")["main"]
            result = main(run["args"])
            status.update(ok=True, global_step=result.global_step, losses=result.losses)
        except Exception:  # recorded, so that the test names the run that broke
            status.update(ok=False, error=traceback.format_exc())
        out.mkdir(parents=True, exist_ok=True)
        (out / f"status_rank{rank}.json").write_text(json.dumps(status))
        if not status["ok"]:  # the processes may be out of step now: stop here
            break
    PartialState().destroy_process_group()


def _fsdp_check(out: str) -> None:
    """Under torch FSDP (FULL_SHARD, original parameters; gloo on CPU): the trainer's ``_full_weights`` gives the EMA
    update and the EMA copy the full weights, the same on every rank. Writes ``out/rank{r}.json``."""
    import types

    import torch
    import torch.distributed as dist
    from accelerate.utils import DistributedType, extract_model_from_parallel
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    from sr_diffusion.models import SRVGGNetCompact
    from sr_diffusion.training.ema import copy_with_ema_weights, create_ema
    from sr_diffusion.training.trainer import _full_weights, state_digests

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4)
    full_shapes = [tuple(p.shape) for p in model.parameters()]
    ema = create_ema(model, decay=0.9)
    wrapped = FullyShardedDataParallel(
        model, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True, device_id=torch.device("cpu")
    )
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.FSDP, unwrap_model=extract_model_from_parallel, is_main_process=rank == 0
    )
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    weights = []  # the full weights after each step
    for _ in range(2):
        wrapped(x).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with _full_weights(accelerator, wrapped):
            ema.step(accelerator.unwrap_model(wrapped).parameters())
            weights.append([p.detach().clone() for p in accelerator.unwrap_model(wrapped).parameters()])
    sharded_shapes = [tuple(p.shape) for p in accelerator.unwrap_model(wrapped).parameters()]
    # diffusers' EMA warm-up: d_1 = 0 (a copy of w_1), d_2 = 2/11, so ema = w_1 - (1 - 2/11) (w_1 - w_2)
    expected = [w1 - (1 - 2 / 11) * (w1 - w2) for w1, w2 in zip(*weights)]
    ema_error = max(float((e - s).abs().max()) for e, s in zip(expected, ema.shadow_params))
    with _full_weights(accelerator, wrapped):
        inner = accelerator.unwrap_model(wrapped)
        names = [name for name, _ in inner.named_parameters()]
        record = {
            "sharded_outside": sharded_shapes != full_shapes,
            "full_inside": [tuple(p.shape) for p in inner.parameters()] == full_shapes,
            "ema_error": ema_error,
            "weight_scale": max(float(w.abs().max()) for w in weights[-1]),
            "model": state_digests(dict(inner.named_parameters())),
            "ema": state_digests(dict(zip(names, ema.shadow_params))),
            "copy": state_digests(dict(copy_with_ema_weights(inner, ema).named_parameters())),
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--fsdp-check":
        _fsdp_check(sys.argv[2])
    else:
        _run_spec(sys.argv[1])
    sys.exit(0)


# ----------------------------------------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import accelerate_launch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sr_diffusion.training.trainer import STATE_DIGESTS_ENV, state_digests  # noqa: E402

assert DIGESTS_ENV == STATE_DIGESTS_ENV

pytestmark = pytest.mark.slow

# The regression run: the same one as tests/test_training_subprocess.py's single-process SIGKILL test.
MAX_STEPS = 24
REGRESSION_ARGS = [
    "--config", str(CONFIGS / "regression_tiny.yaml"), f"train.max_steps={MAX_STEPS}", "train.checkpointing_steps=4",
    "train.checkpoints_total_limit=2", "train.validation_steps=8", "train.ema_decay=0.9", "optim.scheduler=cosine",
    "optim.warmup_steps=3", "data.num_workers=0",
]  # fmt: skip
REGRESSION_LR = 3.0e-3  # optim.lr of regression_tiny.yaml
DIFFUSION_STEPS = 4
# optim.eps=1e-3 (the diffusion runs): some ResShiftUNet parameters have a gradient that cancels by structure to the
# rounding level (|g| ~ 1e-7, e.g. output_blocks.3.0.out_layers.3.bias), where Adam's default eps=1e-8 turns a
# float32 reordering of the batch sums into an O(lr) change of its step (g / (|g| + eps)), which later steps carry
# everywhere. A larger eps keeps Adam's step a smooth function of the gradient there, so the 1 x 2B comparison
# measures the split, not Adam's sign(0). The bit-exact comparison with gradient accumulation holds at any eps.
DIFFUSION_ARGS = [
    f"train.max_steps={DIFFUSION_STEPS}", f"train.checkpointing_steps={DIFFUSION_STEPS}", "train.validation_steps=0",
    "train.report_to=none", "optim.eps=1e-3",
]  # fmt: skip
RESSHIFT_ARGS = ["--config", str(CONFIGS / "resshift_tiny.yaml"), *DIFFUSION_ARGS]
DIFFUSION_LR = 2.0e-3  # optim.lr of resshift_tiny.yaml, sr3_tiny.yaml and srdiff_tiny.yaml
SD_LR = 1.0e-3  # optim.lr of stablesr_tiny.yaml, pasd_tiny.yaml and seesr_tiny.yaml
# Compared across process counts (name, steps, lr): the regression task and every task that draws per sample.
EQUIVALENT_RUNS = [
    ("regression", MAX_STEPS, REGRESSION_LR),
    ("resshift", DIFFUSION_STEPS, DIFFUSION_LR),
    ("sr3", DIFFUSION_STEPS, DIFFUSION_LR),
    ("srdiff", DIFFUSION_STEPS, DIFFUSION_LR),
    ("stablesr", DIFFUSION_STEPS, SD_LR),
    ("pasd", DIFFUSION_STEPS, SD_LR),
    ("seesr", DIFFUSION_STEPS, SD_LR),
]
SMOKE_NAMES = (
    "regression_tiny", "resshift_tiny", "sr3_tiny", "srdiff_rrdb_tiny", "srdiff_tiny", "autoencoder_tiny", "dape_tiny",
    "degradation_estimator_tiny", "stablesr_tiny", "stablesr_cfw_tiny", "pasd_tiny", "seesr_tiny",
    "regression_default_x4", "resshift_default_x4",
)  # fmt: skip
# Every run of the smoke group: 2 steps, one checkpoint, no validation, no trackers.
SMOKE = ["train.max_steps=2", "train.checkpointing_steps=2", "train.validation_steps=0", "train.report_to=none"]


def _smoke_runs(fixtures: dict[str, Path]) -> dict[str, tuple[Path, list[str]]]:
    """Every method's tiny config, and the regression and ResShift defaults at a small crop and batch."""
    return {
        "regression_tiny": (TRAIN / "train_regression.py", ["--config", CONFIGS / "regression_tiny.yaml"]),
        "resshift_tiny": (TRAIN / "train_resshift.py", ["--config", CONFIGS / "resshift_tiny.yaml"]),
        "sr3_tiny": (TRAIN / "train_sr3.py", ["--config", CONFIGS / "sr3_tiny.yaml"]),
        "srdiff_rrdb_tiny": (TRAIN / "train_regression.py", ["--config", CONFIGS / "srdiff_rrdb_tiny.yaml"]),
        "srdiff_tiny": (
            TRAIN / "train_srdiff.py",
            ["--config", CONFIGS / "srdiff_tiny.yaml", f"srdiff.rrdb_path={fixtures['srdiff_encoder']}"],
        ),
        "autoencoder_tiny": (TRAIN / "train_autoencoder.py", ["--config", CONFIGS / "autoencoder_tiny.yaml"]),
        "dape_tiny": (TRAIN / "train_dape.py", ["--config", CONFIGS / "dape_tiny.yaml"]),
        "degradation_estimator_tiny": (
            TRAIN / "train_degradation_estimator.py",
            ["--config", CONFIGS / "degradation_estimator_tiny.yaml"],
        ),
        "stablesr_tiny": (
            TRAIN / "train_stablesr.py",
            ["--config", CONFIGS / "stablesr_tiny.yaml", f"stablesr.base={fixtures['stablesr_base']}"],
        ),
        "stablesr_cfw_tiny": (
            TRAIN / "train_stablesr.py",
            [
                "--stage",
                "cfw",
                "--config",
                CONFIGS / "stablesr_cfw_tiny.yaml",
                f"cfw.pipeline={fixtures['stablesr_first_stage']}",
                "cfw.latents=generated",
                "cfw.num_inference_steps=2",
            ],
        ),  # fmt: skip
        "pasd_tiny": (
            TRAIN / "train_pasd.py",
            ["--config", CONFIGS / "pasd_tiny.yaml", f"pasd.base={fixtures['pasd_base']}"],
        ),
        "seesr_tiny": (
            TRAIN / "train_seesr.py",
            [
                "--config",
                CONFIGS / "seesr_tiny.yaml",
                f"seesr.base={fixtures['seesr_base']}",
                f"seesr.dape={fixtures['seesr_dape']}",
            ],
        ),  # fmt: skip
        "regression_default_x4": (
            TRAIN / "train_regression.py",
            [
                "--config",
                CONFIGS / "regression_default_x4.yaml",
                "data.source=skimage_sklearn",
                "data.gt_size=32",
                "data.batch_size=1",
                "data.num_workers=0",
                "validation.source=skimage_sklearn",
            ],
        ),  # fmt: skip
        "resshift_default_x4": (
            TRAIN / "train_resshift.py",
            [
                "--config",
                CONFIGS / "resshift_default_x4.yaml",
                "data.source=skimage_sklearn",
                "data.gt_size=64",
                "data.batch_size=1",
                "data.num_workers=0",
                "validation.source=skimage_sklearn",
            ],
        ),  # fmt: skip
    }


def _spec(runs: dict[str, tuple[Path, list]], root: Path) -> Path:
    spec = {
        name: {
            "script": str(script),
            "args": [*map(str, args), f"train.output_dir={root / name}"],
            "out": str(root / name),
        }
        for name, (script, args) in runs.items()
    }
    path = root / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def _launch_spec(runs, root: Path, num_processes: int, launch_args=(), timeout: int = 600):
    root.mkdir(parents=True, exist_ok=True)
    proc = accelerate_launch(
        Path(__file__), [_spec(runs, root)], root, timeout=timeout, num_processes=num_processes, launch_args=launch_args
    )
    (root / "launch.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _status(out: Path, rank: int) -> dict:
    path = out / f"status_rank{rank}.json"
    assert path.is_file(), f"rank {rank} recorded nothing for {out.name}"
    status = json.loads(path.read_text())
    assert status["ok"], status.get("error")
    return status


def _digests(out: Path, rank: int) -> dict:
    return json.loads((out / "digests" / f"rank{rank}.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max()}"


@pytest.fixture(scope="module")
def sd_fixtures(tmp_path_factory) -> dict[str, Path]:
    """The frozen parts the SD add-on and SRDiff tiny configs need, made as their own tests make them."""
    import pasd_tiny
    import seesr_tiny
    import stablesr_tiny

    from sr_diffusion.models import RRDBNet
    from sr_diffusion.pipelines import RegressionSRPipeline, StableSRPipeline
    from sr_diffusion.training import load_config

    root = tmp_path_factory.mktemp("frozen")
    config = load_config(CONFIGS / "srdiff_rrdb_tiny.yaml")
    torch.manual_seed(0)
    RegressionSRPipeline(model=RRDBNet(scale=config.scale, **config.model.kwargs)).save_pretrained(root / "rrdb")
    StableSRPipeline(**stablesr_tiny.tiny_components(cfw=False)).save_pretrained(root / "stablesr_first_stage")
    seesr_tiny.tiny_dape().save_pretrained(root / "seesr_dape")
    return {
        "srdiff_encoder": root / "rrdb",
        "stablesr_base": stablesr_tiny.save_sd_base(stablesr_tiny.tiny_components(), root / "stablesr_base"),
        "stablesr_first_stage": root / "stablesr_first_stage",
        "pasd_base": stablesr_tiny.save_sd_base(pasd_tiny.tiny_components(), root / "pasd_base"),
        "seesr_base": stablesr_tiny.save_sd_base(seesr_tiny.tiny_components(), root / "seesr_base"),
        "seesr_dape": root / "seesr_dape",
    }


def _equivalence_runs(fixtures: dict[str, Path]) -> dict[str, tuple[Path, list]]:
    """The runs compared across process counts (without data.batch_size, which each launch sets)."""
    return {
        "regression": (TRAIN / "train_regression.py", REGRESSION_ARGS),
        "resshift": (TRAIN / "train_resshift.py", RESSHIFT_ARGS),
        "sr3": (TRAIN / "train_sr3.py", ["--config", CONFIGS / "sr3_tiny.yaml", *DIFFUSION_ARGS]),
        "srdiff": (
            TRAIN / "train_srdiff.py",
            [
                "--config",
                CONFIGS / "srdiff_tiny.yaml",
                f"srdiff.rrdb_path={fixtures['srdiff_encoder']}",
                *DIFFUSION_ARGS,
            ],
        ),  # fmt: skip
        "stablesr": (
            TRAIN / "train_stablesr.py",
            ["--config", CONFIGS / "stablesr_tiny.yaml", f"stablesr.base={fixtures['stablesr_base']}", *DIFFUSION_ARGS],
        ),  # fmt: skip
        "pasd": (
            TRAIN / "train_pasd.py",
            ["--config", CONFIGS / "pasd_tiny.yaml", f"pasd.base={fixtures['pasd_base']}", *DIFFUSION_ARGS],
        ),
        "seesr": (
            TRAIN / "train_seesr.py",
            [
                "--config",
                CONFIGS / "seesr_tiny.yaml",
                f"seesr.base={fixtures['seesr_base']}",
                f"seesr.dape={fixtures['seesr_dape']}",
                *DIFFUSION_ARGS,
            ],
        ),  # fmt: skip
    }


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, sd_fixtures) -> tuple[Path, str]:
    """One launch of two gloo processes with configs/accelerate/multi_gpu.yaml: the runs of the equivalence tests
    (2 samples per process), then every smoke run. Returns the run folder and the launch's output."""
    root = tmp_path_factory.mktemp("two_processes")
    runs = {
        name: (script, [*args, "data.batch_size=2"]) for name, (script, args) in _equivalence_runs(sd_fixtures).items()
    }
    runs.update({name: (script, [*args, *SMOKE]) for name, (script, args) in _smoke_runs(sd_fixtures).items()})
    assert tuple(runs)[len(EQUIVALENT_RUNS) :] == SMOKE_NAMES
    log = _launch_spec(runs, root, 2, launch_args=["--config_file", ACCELERATE_CONFIGS / "multi_gpu.yaml"])
    return root, log


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, sd_fixtures) -> Path:
    """The same runs on one process: with the global batch of 4 (``<name>``), and with batches of 2 and gradient
    accumulation over 2 micro-batches (``<name>_accumulated``)."""
    root = tmp_path_factory.mktemp("one_process")
    accumulate = ["data.batch_size=2", "train.gradient_accumulation_steps=2"]
    runs = {}
    for name, (script, args) in _equivalence_runs(sd_fixtures).items():
        runs[name] = (script, [*args, "data.batch_size=4"])
        runs[f"{name}_accumulated"] = (script, [*args, *accumulate])
    _launch_spec(runs, root, 1)
    return root


# ----------------------------------------------------------------------------------------------------------------------
# every method on two processes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMOKE_NAMES)
def test_every_tiny_config_and_the_defaults_train_on_two_processes(two_processes, name):
    root, _ = two_processes
    out = root / name
    statuses = [_status(out, rank) for rank in (0, 1)]
    assert [s["global_step"] for s in statuses] == [2, 2]
    # the logged loss is the mean over both processes: the same number on each
    assert statuses[0]["losses"] == statuses[1]["losses"] and all(math.isfinite(x) for x in statuses[0]["losses"])
    # one checkpoint, with each process's RNG state; the exported pipeline
    ckpt = out / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (out / "pipeline").is_dir() and not [p for p in out.iterdir() if p.name.startswith(".")]
    # both ranks end with the same weights and EMA
    digests = [_digests(out, rank) for rank in (0, 1)]
    assert digests[0]["model"] == digests[1]["model"]
    assert digests[0].get("ema") == digests[1].get("ema")


# ----------------------------------------------------------------------------------------------------------------------
# 2 processes x B = 1 process x 2B
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, steps, lr", EQUIVALENT_RUNS)
def test_two_processes_are_bit_identical_to_one_process_accumulating_the_two_halves(
    two_processes, one_process, name, steps, lr
):
    """Rank r's micro-batch is the second run's micro-batch r of the same step, with the same per-sample draws, and
    DDP's (g0 + g1) / 2 is the accumulated g0 / 2 + g1 / 2 exactly (halving is exact in binary floating point):
    the same float32 operations, so the same bits."""
    two, one = two_processes[0] / name, one_process / f"{name}_accumulated"
    for part in ("model", "ema"):
        _assert_identical(_weights(two / f"checkpoint-{steps}" / part), _weights(one / f"checkpoint-{steps}" / part))
    opt_two = torch.load(two / f"checkpoint-{steps}" / "optimizer.bin", weights_only=True)["state"]
    opt_one = torch.load(one / f"checkpoint-{steps}" / "optimizer.bin", weights_only=True)["state"]
    assert opt_two.keys() == opt_one.keys()
    for key in opt_two:
        for field, value in opt_two[key].items():
            assert torch.equal(value, opt_one[key][field]), (key, field)
    assert _status(two, 0)["losses"] == _status(one, 0)["losses"]  # the logged loss: the global batch's mean


def _tolerance(steps: int, lr: float) -> float:
    """How far float32 rounding may move a weight between 2 x B and 1 x 2B.

    Both runs see the same samples and draws, so their gradients differ only by the order of the float32 sums
    over the batch (two per-process means averaged by DDP against one mean over the global batch): a relative change
    of ``c * eps * kappa`` with ``eps = 2**-24`` and ``kappa`` the conditioning of the sum. Adam's step
    ``lr_t * m / (sqrt(v) + eps_adam)`` is scale-free, so it changes by at most ``lr_t`` times that. Allowing
    ``c * kappa`` up to ``2**14`` over ``steps`` steps gives ``steps * lr * 2**-10``. A wrong split (other samples,
    noise or timesteps on a rank) changes Adam's normalised step by O(1), i.e. the weights by O(lr) per step,
    a thousand times more.
    """
    return steps * lr * 2.0**-10


@pytest.mark.parametrize("name, steps, lr", EQUIVALENT_RUNS)
def test_two_processes_train_the_weights_of_one_process_with_the_global_batch(
    two_processes, one_process, name, steps, lr
):
    two, one = two_processes[0] / name, one_process / name
    tol = _tolerance(steps, lr)
    for part in ("model", "ema"):
        a, b = _weights(two / f"checkpoint-{steps}" / part), _weights(one / f"checkpoint-{steps}" / part)
        assert a.keys() == b.keys()
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert worst <= tol, (part, worst, tol)
    # the loss of every step (the global batch's mean, through weights equal up to rounding): a float32 mean over
    # 12288 values in another order, far below the 2**-13 relative allowed; another batch would differ by ~10%
    losses_two, losses_one = _status(two, 0)["losses"], _status(one, 0)["losses"]
    assert len(losses_two) == len(losses_one) == steps
    assert losses_two == pytest.approx(losses_one, rel=2.0**-13)


def test_the_equivalence_tolerance_is_small_against_what_training_moves(two_processes):
    """The tolerance discriminates: the regression run moves its weights from their initial values (the trainer
    seeds the global RNG with train.seed, then builds the model) by far more than it allows."""
    from accelerate.utils import set_seed

    from sr_diffusion.training import RegressionTask, load_config

    set_seed(0)
    initial = RegressionTask().build_model(load_config(REGRESSION_ARGS[1])).state_dict()
    trained = _weights(two_processes[0] / "regression" / f"checkpoint-{MAX_STEPS}" / "model")
    moved = max(float((trained[k] - initial[k]).abs().max()) for k in trained)
    assert moved > 100 * _tolerance(MAX_STEPS, REGRESSION_LR), moved


# ----------------------------------------------------------------------------------------------------------------------
# ranks, checkpoints, validation and logging
# ----------------------------------------------------------------------------------------------------------------------


def test_every_rank_holds_the_checkpointed_weights_and_ema(two_processes):
    root, _ = two_processes
    out = root / "regression"
    digests = [_digests(out, rank) for rank in (0, 1)]
    assert digests[0]["global_step"] == digests[1]["global_step"] == MAX_STEPS
    assert digests[0]["model"] == digests[1]["model"] and digests[0]["ema"] == digests[1]["ema"]
    # the checkpoint written by the main process holds exactly what every rank holds
    ckpt = out / f"checkpoint-{MAX_STEPS}"
    assert state_digests(_weights(ckpt / "model")) == digests[0]["model"]
    ema = state_digests(_weights(ckpt / "ema"))
    assert {k: ema[k] for k in digests[0]["ema"]} == digests[0]["ema"]
    # one set of model files, one RNG file per process, nothing else per rank
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["ema", "model", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin",
                     "training_state.json"]  # fmt: skip


def test_validation_and_logging_run_on_the_main_process_only(two_processes):
    root, log = two_processes
    for step in (8, 16, 24):
        assert log.count(f"step {step}: PSNR") == 1, step
    assert log.count(f"Saved pipeline to {root / 'regression' / 'pipeline'}") == 1
    # tensorboard files (scalars, and hparams in a subfolder) from one process, the main one: their names end
    # with <host>.<pid>.<n>
    events = list((root / "regression" / "logs").rglob("events.out.tfevents.*"))
    assert events and len({path.name.split(".")[-2] for path in events}) == 1, events


# ----------------------------------------------------------------------------------------------------------------------
# exact resume after SIGKILL, two processes (with configs/accelerate/multi_node.yaml, brought down to one machine)
# ----------------------------------------------------------------------------------------------------------------------


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it (torchrun starts its workers in sessions of their own, so the
    launcher's process group does not hold them)."""
    import psutil

    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def test_sigkill_then_resume_on_two_processes_gives_bit_identical_weights(two_processes, tmp_path):
    reference = two_processes[0] / "regression"
    out = tmp_path / "run"
    launch = ["--config_file", ACCELERATE_CONFIGS / "multi_node.yaml", "--machine_rank", "0"]
    args = [*REGRESSION_ARGS, f"train.output_dir={out}"]
    proc = accelerate_launch(TRAIN / "train_regression.py", args, tmp_path, num_processes=2, launch_args=launch,
                             popen=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-4").is_dir():
            assert proc.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-4 after 240 s"
            time.sleep(0.005)
        _kill_tree(proc.pid)  # the launcher, torchrun's agent and both training processes
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "pipeline").exists(), "the run finished before it could be killed"
    killed_at = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert killed_at and killed_at[-1] < MAX_STEPS

    resumed = accelerate_launch(
        TRAIN / "train_regression.py", [*args, "--resume_from_checkpoint", "latest"], tmp_path, num_processes=2,
        launch_args=launch, env={DIGESTS_ENV: str(out / "digests")},
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert f"Resuming from {out / f'checkpoint-{killed_at[-1]}'}" in resumed.stdout + resumed.stderr

    # every process read the checkpoint back: both end where the uninterrupted run's ranks ended
    for rank in (0, 1):
        assert _digests(out, rank) == _digests(reference, rank)
    _assert_identical(_weights(out / "pipeline" / "model"), _weights(reference / "pipeline" / "model"))
    for part in ("model", "ema"):
        _assert_identical(
            _weights(out / f"checkpoint-{MAX_STEPS}" / part), _weights(reference / f"checkpoint-{MAX_STEPS}" / part)
        )


# ----------------------------------------------------------------------------------------------------------------------
# configs/accelerate
# ----------------------------------------------------------------------------------------------------------------------


def _launcher_args(config_file: Path):
    """What ``accelerate launch --config_file config_file script.py`` resolves to (accelerate's own parser and
    checks), without launching anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "script.py"])
    return _validate_launch_command(args)[0]


def test_accelerate_configs_parse_with_accelerates_own_classes():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    configs = {path.stem: path for path in sorted(ACCELERATE_CONFIGS.glob("*.yaml"))}
    assert set(configs) == {"multi_gpu", "multi_node", "fsdp", "deepspeed_zero2"}
    loaded = {name: load_config_from_file(str(path)) for name, path in configs.items()}
    assert all(isinstance(c, ClusterConfig) for c in loaded.values())

    ddp = loaded["multi_gpu"]
    assert (ddp.distributed_type, ddp.num_machines, ddp.machine_rank, ddp.use_cpu) == (
        DistributedType.MULTI_GPU, 1, 0, False)  # fmt: skip
    assert ddp.num_processes > 1 and ddp.mixed_precision == "no" and ddp.main_process_ip is None

    node = loaded["multi_node"]
    assert (node.distributed_type, node.num_machines, node.machine_rank) == (DistributedType.MULTI_GPU, 2, 0)
    assert node.num_processes % node.num_machines == 0 and node.num_processes > node.num_machines
    assert node.main_process_ip and isinstance(node.main_process_port, int) and node.rdzv_backend == "static"

    fsdp = loaded["fsdp"]
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 1 and fsdp.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    # one unit around the trained add-ons (the frozen base is never wrapped); original parameters for the EMA
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "NO_WRAP" and fsdp.fsdp_config["fsdp_use_orig_params"] is True
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"

    ds = loaded["deepspeed_zero2"]
    assert ds.distributed_type == DistributedType.DEEPSPEED and ds.deepspeed_config["zero_stage"] == 2
    assert ds.deepspeed_config["offload_optimizer_device"] == "none"

    # accelerate launch's own validation picks the intended launcher for each
    for name, flag in (("multi_gpu", "multi_gpu"), ("multi_node", "multi_gpu"), ("fsdp", "use_fsdp")):
        args = _launcher_args(configs[name])
        assert getattr(args, flag), name
        assert (args.num_processes, args.num_machines) == (loaded[name].num_processes, loaded[name].num_machines)
    args = _launcher_args(configs["deepspeed_zero2"])
    assert args.use_deepspeed and args.zero_stage == 2


def test_separate_processes_are_refused(tmp_path):
    """Two processes that a launcher started but that did not join one group (``--multi_gpu`` on a machine without
    GPUs, without ``ACCELERATE_USE_CPU``) would each train alone into the same folder: the trainer refuses."""
    proc = accelerate_launch(
        TRAIN / "train_regression.py",
        [*REGRESSION_ARGS, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"],
        tmp_path,
        num_processes=2,
        env={"ACCELERATE_USE_CPU": "false", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode != 0
    assert "not one data-parallel group" in proc.stderr


def test_fsdp_full_weights_feed_the_ema_on_every_rank(tmp_path):
    """FSDP cannot be started through accelerate on CPU (it stays MULTI_CPU, i.e. DDP), so the trainer's FSDP path
    is checked on torch FSDP directly (gloo, two processes via torchrun): outside ``_full_weights`` each rank holds a
    shard, inside it the full weights, so the EMA (built from the full model) updates and copies correctly, the same
    on both ranks."""
    import subprocess

    from conftest import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, "--fsdp-check", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["sharded_outside"] and record["full_inside"]
        # the EMA followed the full weights: w_1 - (9/11)(w_1 - w_2) in another float32 order, a few ulp of the
        # weights apart (a shard or a stale weight would be off by the weights' own size)
        assert record["ema_error"] <= 8 * 2.0**-24 * record["weight_scale"], record["ema_error"]
        assert record["copy"] == record["ema"]  # the validation/export copy carries exactly the EMA
    assert records[0]["model"] == records[1]["model"] and records[0]["ema"] == records[1]["ema"]
