"""The Hydra recipes compose into the typed schema and validate; bad configs fail early, naming what
to change."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from megatron_exaone.config.load import RECIPES_ENV, load_config, recipes_dir, save_resolved
from megatron_exaone.config.schema import RecipeError, WandbConfig
from megatron_exaone.curriculum import LRPhase, Stage
from megatron_exaone.precision import registry
from megatron_exaone.precision.registry import PRECISIONS
from megatron_exaone.training.device import resolve_device
from megatron_exaone.training.plan import validate

# FP8 precision name -> the module of its backend
FP8_BACKEND_MODULES = {
    name: f"megatron_exaone.precision.{p.backend}" for name, p in PRECISIONS.items() if p.backend
}

RECIPES = recipes_dir()
K_EXAONE_64 = ["experiment=k_exaone_236b_h100x64"]

# Every recipe file -> (extra overrides it needs to make a complete run, world size). Validated with
# device_type=None: only what this build contains is checked, not this machine (see
# test_fp8_availability_on_cpu).
CASES = {
    "model/tiny": ([], 1),
    "model/k_exaone_236b": ([], 1),
    "model/proxy_2b": ([], 1),
    # needs a checkpoint: see tests/parity/test_convert_checkpoint.py
    "model/from_checkpoint": (None, 1),
    "parallel/single": ([], 2),
    "parallel/cpu_tp2": ([], 2),
    "parallel/cpu_tp2_pp2_ep2": ([], 8),
    "parallel/cpu_4proc": ([], 4),
    "parallel/k_exaone_236b_h100x64": (K_EXAONE_64, 64),
    "parallel/k_exaone_236b_h100x256": (K_EXAONE_64, 256),
    "optim/adamw": ([], 1),
    "optim/muon": ([], 1),
    "data/sample": ([], 1),
    "data/example": (K_EXAONE_64, 64),
    "curriculum/cpu_tiny": ([], 1),
    "curriculum/k_exaone": (K_EXAONE_64, 64),
    "experiment/cpu_tiny": ([], 4),
    "experiment/k_exaone_236b_h100x64": ([], 64),
    "experiment/k_exaone_236b_h100x256": ([], 256),
    "experiment/k_exaone_236b_h100x64_adamw_offload": ([], 64),
    **{f"precision/{name}": ([], 1) for name in PRECISIONS},
}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _load(*overrides: str):
    return load_config(list(overrides))


def _error(overrides, world_size: int = 1, device_type=None) -> str:
    with pytest.raises(RecipeError) as info:
        validate(load_config(list(overrides)), world_size, device_type)
    return str(info.value)


def test_every_recipe_file_has_a_case():
    files = {str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.glob("*/*.yaml")}
    assert files == set(CASES)


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_recipe_composes_and_validates(recipe):
    group, name = recipe.split("/")
    extra, world_size = CASES[recipe]
    if extra is None:
        with pytest.raises(RecipeError, match="needs a checkpoint"):
            validate(_load(f"{group}={name}"), world_size)
        return
    cfg = _load(*extra, f"{group}={name}")
    if name in FP8_BACKEND_MODULES and not _module_exists(FP8_BACKEND_MODULES[name]):
        with pytest.raises(RecipeError, match="FP8 backend not available in this build"):
            validate(cfg, world_size)
        return
    checked = validate(cfg, world_size)
    assert checked.dims.world_size == world_size
    assert len(checked.stage_parallel) == len(cfg.curriculum.stages)


def test_recipe_stages_are_the_curriculum_classes():
    cfg = _load("experiment=cpu_tiny", "curriculum.stages.0.lr.peak_lr=0.002")
    stage = cfg.curriculum.stages[0]
    assert type(stage) is Stage and type(stage.lr) is LRPhase and stage.lr.peak_lr == 0.002
    assert type(stage.mixture) is dict and cfg.curriculum.build().stages[0] is stage


def test_cpu_tiny_experiment_with_overrides():
    cfg = _load("experiment=cpu_tiny", "parallel.tp=2", "trainer.max_steps=3", "run_dir=/tmp/x")
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.dp) == (2, 2, 2, 1)
    assert cfg.trainer.max_steps == 3 and cfg.trainer.device == "cpu" and cfg.run_dir == "/tmp/x"
    assert cfg.data.prepare_sample and not cfg.wandb.enabled
    checked = validate(cfg, 4, device_type="cpu")
    assert checked.model.num_hidden_layers == 4 and checked.model.vocab_size == 4096
    steps, tokens = 0, 0
    while not checked.curriculum.is_finished(tokens):
        tokens += checked.curriculum.plan(tokens).tokens
        steps += 1
    assert steps == 30
    assert [checked.curriculum.plan(t).stage.name for t in (0, 20 * 8 * 64)] == ["short", "long"]


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("trainer.max_stepz=3", "trainer.max_stepz", "trainer.max_steps"),
        ("+trainer.max_stepz=3", "trainer.max_stepz", "trainer.max_steps"),
        ("model.hiden_size=3", "model.hiden_size", "model.hidden_size"),
        ("+model.hiden_size=3", "model.hiden_size", "model.hidden_size"),
        ("curriculum.stages.0.lr.peak=1", "curriculum.stages.0.lr.peak", "peak_lr"),
    ],
)
def test_unknown_key_is_named_with_a_suggestion(override, key, suggestion):
    with pytest.raises(RecipeError) as info:
        _load(override)
    message = str(info.value)
    assert f"'{key}'" in message and suggestion in message and override in message
    assert "\n" not in message


def test_a_model_field_the_recipe_does_not_set_says_how_to_add_it():
    with pytest.raises(
        RecipeError,
        match=r"'model.mtp_loss_weight' is not set .* add it with "
        r"'\+model.mtp_loss_weight=VALUE'",
    ):
        _load("model.mtp_loss_weight=0")
    assert _load("+model.mtp_loss_weight=0").model["mtp_loss_weight"] == 0


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path):
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES, recipes)
    (recipes / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ntrainer:\n  max_stepz: 3\n"
    )
    with pytest.raises(
        RecipeError, match=r"trainer\.max_stepz.*experiment/typo\.yaml.*trainer\.max_steps"
    ):
        load_config(["experiment=typo"], config_dir=recipes)


def test_bad_value_and_unknown_option():
    with pytest.raises(RecipeError, match=r"trainer\.max_steps.*abc"):
        _load("trainer.max_steps=abc")
    with pytest.raises(RecipeError, match=r"precision/fp9.*bf16"):
        _load("precision=fp9")
    with pytest.raises(RecipeError, match=r"optim\.name='sgd'.*adamw, muon"):
        _load("optim.name=sgd")


def test_impossible_layout_names_the_constraint():
    message = _error(["experiment=cpu_tiny", "parallel.tp=3"], world_size=4)
    assert "tp=3" in message and "world size is 4" in message and "valid tp values: 1, 2" in message
    message = _error(["experiment=cpu_tiny", "parallel.ep=4"], world_size=4)
    assert "ep=4" in message and "MoE parallel folding" in message
    message = _error(["experiment=cpu_tiny", "model.num_experts=5"], world_size=4)
    assert "ep=2 does not divide num_experts=5" in message


def test_stage_budget_that_does_not_add_up_names_the_stage():
    message = _error(["curriculum.stages.1.tokens=10000"])
    assert "'long'" in message and "tokens=9216 or tokens=10240" in message


def test_mixture_of_an_unknown_dataset_names_it():
    message = _error(["+curriculum.stages.0.mixture.web=1.0"])
    assert "'short'" in message and "'web'" in message and "sample" in message


@pytest.mark.parametrize(
    "overrides, world_size, expected",
    [
        (
            ["experiment=cpu_tiny", "parallel=cpu_tp2_pp2_ep2", "trainer.micro_batch_size=3"],
            8,
            "micro_batch_size x dp = 3 x 2 = 6",
        ),
        (["model.max_position_embeddings=100"], 1, "max_position_embeddings=100"),
        (["experiment=cpu_tiny", "parallel.vpp=2"], 4, "vpp=2"),
        (
            ["experiment=cpu_tiny", "parallel.pipeline_layout='Ett|tL'"],
            4,
            "pipeline layout 'Ett|tL'",
        ),
        (
            [
                "experiment=cpu_tiny",
                "curriculum.stages.0.seq_len=65",
                "curriculum.stages.0.tokens=10400",
            ],
            4,
            "not divisible by tp=2",
        ),
        (
            [
                "precision=fp8_emulated",
                "precision.keep_bf16_first_layers=3",
                "precision.keep_bf16_last_layers=2",
            ],
            1,
            "exceeds the model's 4 layers",
        ),
        (
            ["parallel.compile=true", "parallel.recompute=selective"],
            1,
            "parallel.compile=true with recompute=selective",
        ),
        (["parallel.compile=true", "precision=fp8_te_blockwise"], 1, "Transformer Engine modules"),
        (
            [
                "precision=fp8_te_tensorwise",
                "curriculum.stages.0.seq_len=68",
                "curriculum.stages.0.tokens=10880",
            ],
            1,
            "68 tokens reach each linear",
        ),
        (
            [
                "experiment=cpu_tiny",
                "parallel.cp=2",
                "parallel.tp=1",
                "precision=fp8_te_tensorwise",
                "precision.te_attention=true",
            ],
            4,
            "context parallel attention runs on SDPA",
        ),
        (
            ["precision=fp8_torch", "precision.te_attention=true"],
            1,
            "precision.te_attention=true needs a Transformer Engine precision",
        ),
        (
            ["precision=fp8_te_delayed", "precision.fp8_weight_cache=true"],
            1,
            "precision.fp8_weight_cache=true applies to fp8_torch and fp8_emulated",
        ),
        (
            [
                "experiment=cpu_tiny",
                "parallel.pipeline_schedule=zbv",
                "parallel.vpp=2",
                "parallel.reduce_grads_each_micro_batch=true",
            ],
            4,
            "use 1f1b or interleaved_1f1b",
        ),
    ],
)
def test_cross_field_checks(overrides, world_size, expected):
    assert expected in _error(overrides, world_size)


def test_k_exaone_curriculum():
    cfg = _load(*K_EXAONE_64)
    checked = validate(cfg, 64)
    assert abs(checked.curriculum.total_tokens - 11e12) < 0.01e12
    assert [s.seq_len for s in checked.curriculum.stages] == [8192, 8192, 8192, 32768, 262144]
    assert {s.lr.peak_lr for s in checked.curriculum.stages[:3]} == {3e-4}
    assert all(
        (s.mtp_loss_weight, s.aux_loss_coeff, s.bias_update_rate) == (0.05, 1e-4, 1e-4)
        for s in checked.curriculum.stages
    )
    # dp gives way to context parallel in the long-context stages.
    assert [(p.tp, p.cp, p.pp, p.dp) for p in checked.stage_parallel] == [(4, 1, 8, 2)] * 3 + [
        (4, 2, 8, 1),
        (4, 8, 2, 1),
    ]
    assert [p.reduce_grads_each_micro_batch for p in checked.stage_parallel] == [False] * 4 + [True]
    assert cfg.optim.name == "muon" and cfg.parallel.recompute == "full"


def test_save_resolved_round_trip(tmp_path):
    cfg = _load(*K_EXAONE_64, f"run_dir={tmp_path}", "trainer.max_steps=7")
    path = save_resolved(cfg)
    assert path == tmp_path / "config.yaml"
    assert load_config([], config_dir=tmp_path) == cfg
    assert load_config(["trainer.max_steps=8"], config_dir=tmp_path).trainer.max_steps == 8


def test_relative_data_paths_resolve_against_run_dir(tmp_path):
    cfg = _load(f"run_dir={tmp_path}")
    assert cfg.data.resolved_datasets(cfg.run_dir) == {
        "sample": [str(tmp_path / "data" / "sample")]
    }
    assert cfg.data.resolved_path(cfg.data.tokenizer, cfg.run_dir) == str(
        tmp_path / "data" / "tokenizer"
    )


def test_every_recipe_is_installed_with_the_package():
    """A wheel install has no source checkout: pyproject.toml's data-files must ship every
    recipe."""
    tomllib = pytest.importorskip("tomllib")
    root = RECIPES.parent
    data_files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    shipped = {
        path
        for patterns in data_files.values()
        for pattern in patterns
        for path in root.glob(pattern)
    }
    assert shipped == set(RECIPES.rglob("*.yaml"))
    # each file lands where recipes_dir expects its group
    for target, patterns in data_files.items():
        assert all(
            Path(target) == Path("share/megatron-exaone") / Path(p).parent for p in patterns
        ), target


def test_recipes_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv(RECIPES_ENV, str(tmp_path))
    with pytest.raises(RecipeError, match=RECIPES_ENV):
        recipes_dir()
    assert recipes_dir(RECIPES) == RECIPES


@pytest.mark.parametrize("name", sorted(FP8_BACKEND_MODULES))
def test_fp8_availability_on_cpu(name):
    """Only fp8_emulated may run on CPU, and only in a build that has its backend; the others always
    say why not."""
    backend = _module_exists(FP8_BACKEND_MODULES[name])
    if name == "fp8_emulated" and backend:
        validate(_load(f"precision={name}"), 1, device_type="cpu")
        return
    message = _error([f"precision={name}"], device_type="cpu")
    assert "FP8 backend not available in this build" in message if not backend else name in message


@pytest.mark.parametrize(
    "name, capability, cuda, problem",
    [
        ("fp8_te_tensorwise", (8, 9), "12.4", None),
        ("fp8_te_tensorwise", (8, 6), "12.4", "needs CUDA compute capability 8.9 or newer"),
        ("fp8_te_blockwise", (9, 0), "12.9", None),
        ("fp8_te_blockwise", (9, 0), "12.8", "needs torch built with CUDA 12.9 or newer"),
        ("fp8_te_blockwise", (8, 9), "13.0", "needs CUDA compute capability 9.0 or newer"),
        ("fp8_te_mxfp8", (10, 3), "13.0", None),
        ("fp8_te_mxfp8", (11, 0), "13.0", None),
        ("fp8_te_mxfp8", (12, 0), "13.0", "needs CUDA compute capability 10.x or 11.x"),
        ("fp8_te_mxfp8", (9, 0), "13.0", "needs CUDA compute capability 10.x or 11.x"),
    ],
)
def test_te_hardware_gates_follow_te(monkeypatch, name, capability, cuda, problem):
    """TE 2.20's gates: per-tensor FP8 from sm_89, block scaling from sm_90 with CUDA >= 12.9, MXFP8
    on 10.0 <= sm < 12.0. The machine is described to the check (this one has no GPU and no TE)."""
    monkeypatch.setattr(registry, "_importable", lambda module: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a test GPU")
    monkeypatch.setattr(torch.version, "cuda", cuda)
    cfg = _load(f"precision={name}").precision
    if problem is None:
        registry.validate_precision(cfg, "cuda")
    else:
        with pytest.raises(registry.PrecisionUnavailable, match=problem):
            registry.validate_precision(cfg, "cuda")


def test_cpu_runs_bf16_and_fp32():
    for name in ("bf16", "fp32"):
        validate(_load(f"precision={name}"), 1, device_type="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda():
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="trainer.device=cuda"):
        resolve_device("cuda")


def test_wandb_mode_follows_the_api_key():
    assert WandbConfig().resolved_mode({}) == "offline"
    assert WandbConfig().resolved_mode({"WANDB_API_KEY": "x"}) == "online"
    assert WandbConfig(mode="disabled").resolved_mode({"WANDB_API_KEY": "x"}) == "disabled"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["eval.niah.enabled=true", "data.tokenizer=null"],
            "needs the tokenizer .*: set data.tokenizer",
        ),
        (
            ["eval.niah.enabled=true", "eval.niah.dataset=web"],
            r"eval.niah.dataset='web' is neither an evaluation nor a training dataset \(sample\)",
        ),
    ],
)
def test_a_run_that_will_need_niah_is_checked_before_it_starts(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_config(["experiment=cpu_tiny", *overrides])
