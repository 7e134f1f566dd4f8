"""byol_ray.config: defaults, YAML + override loading, the flat/replace views, and every error path.

Every invalid input must raise `ConfigError` at load time with the offending field (or file) named in
the message, so a typo never reaches Ray or MLflow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from byol_ray.config import (
    AUG_OPS,
    Config,
    ConfigError,
    ViewConfig,
    apply_gpu_recipe,
    load_config,
    parse_override,
    validate,
)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- defaults -----------------------------------------------------------------------------------
def test_defaults_validate_and_follow_the_paper():
    cfg = Config()
    validate(cfg)  # must not raise
    assert Config.from_dict({}) == cfg
    assert Config.from_dict(None) == cfg
    assert load_config() == cfg
    # The paper's recipe (Grill et al. 2020, sec. 3.3 and appendix B).
    assert cfg.optim.tau_base == 0.996
    assert cfg.optim.base_lr == 0.2
    assert cfg.optim.weight_decay == 1.5e-6
    assert cfg.optim.optimizer == "lars"
    assert cfg.model.projector_hidden == 4096 and cfg.model.projector_out == 256
    assert cfg.model.predictor_hidden == 4096
    assert cfg.augment.ops == list(AUG_OPS)
    # T and T' differ only in blur (1.0 vs 0.1) and solarisation (0.0 vs 0.2).
    v1, v2 = cfg.augment.view1, cfg.augment.view2
    assert (v1.blur_prob, v1.solarize_prob) == (1.0, 0.0)
    assert (v2.blur_prob, v2.solarize_prob) == (0.1, 0.2)
    assert dataclasses.replace(v2, blur_prob=1.0, solarize_prob=0.0) == v1


def test_to_dict_from_dict_round_trip():
    cfg = load_config(overrides=["model.width=16", "augment.view1.crop_scale=[0.3,0.9]"])
    d = cfg.to_dict()
    assert d["augment"]["view1"]["crop_scale"] == [0.3, 0.9]  # plain lists, YAML/JSON friendly
    back = Config.from_dict(d)
    assert back == cfg
    assert back.augment.view1.crop_scale == (0.3, 0.9)  # tuples again after coercion


# ---- YAML and overrides -------------------------------------------------------------------------
def test_yaml_then_overrides(tmp_path):
    path = write(
        tmp_path,
        """
optim:
  epochs: 5
  base_lr: 0.3
model:
  width: 16
augment:
  view1:
    crop_scale: [0.2, 1.0]
""",
    )
    cfg = load_config(
        path,
        [
            "optim.epochs=7",  # overrides beat the YAML file
            "optim.warmup_epochs=2",  # an int for a float field
            "optim.weight_decay=1e-3",  # YAML reads this as a string; still a number
            "model.use_predictor=false",
            "augment.ops=crop,flip,blur",  # comma-separated list
            "augment.view2.blur_prob=0.3",  # nested view field
            "augment.view2.blur_sigma=[0.5, 1.5]",
            "run.name=my-run",
        ],
    )
    assert cfg.optim.epochs == 7 and isinstance(cfg.optim.epochs, int)
    assert cfg.optim.base_lr == 0.3  # from the YAML
    assert cfg.optim.warmup_epochs == 2.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.optim.weight_decay == pytest.approx(1e-3)
    assert cfg.model.width == 16
    assert cfg.model.use_predictor is False
    assert cfg.augment.ops == ["crop", "flip", "blur"]
    assert cfg.augment.view1.crop_scale == (0.2, 1.0)
    assert cfg.augment.view2.blur_prob == 0.3
    assert cfg.augment.view2.blur_sigma == (0.5, 1.5)
    assert cfg.run.name == "my-run"
    # Untouched fields keep their defaults, also inside partially given sections.
    d = Config()
    assert cfg.model.backbone == d.model.backbone
    assert cfg.optim.batch_size == d.optim.batch_size
    assert cfg.augment.view1.blur_prob == 1.0
    assert cfg.augment.view2.solarize_prob == 0.2
    assert cfg.augment.view1.crop_ratio == d.augment.view1.crop_ratio


@pytest.mark.parametrize(
    "text, expected", [("true", True), ("false", False), ("True", True), ("no", False), ("yes", True)]
)
def test_bool_override_parsing(text, expected):
    assert load_config(overrides=[f"model.use_predictor={text}"]).model.use_predictor is expected


def test_string_booleans_in_a_dict():
    cfg = Config.from_dict({"model": {"use_predictor": "False", "separate_view_forward": "1"}})
    assert cfg.model.use_predictor is False
    assert cfg.model.separate_view_forward is True


def test_list_override_yaml_syntax_and_int_strings():
    cfg = load_config(overrides=["augment.ops=[crop, blur]", "optim.epochs=3"])
    assert cfg.augment.ops == ["crop", "blur"]
    assert Config.from_dict({"optim": {"epochs": "12"}}).optim.epochs == 12
    assert Config.from_dict({"optim": {"epochs": 4.0}}).optim.epochs == 4


def test_parse_override():
    assert parse_override("optim.epochs=3") == ("optim.epochs", 3)
    assert parse_override("run.name=a=b") == ("run.name", "a=b")  # only the first '=' splits
    assert parse_override("augment.view1.crop_scale=[0.2,1.0]") == ("augment.view1.crop_scale", [0.2, 1.0])
    assert parse_override("run.address=") == ("run.address", "")


def test_empty_yaml_file_is_refused_not_the_defaults(tmp_path):
    # The defaults are a 100-epoch schedule: an empty (or comments-only) file is a mistake, not a request.
    for text in ("", "# nothing yet\n"):
        with pytest.raises(ConfigError, match="is empty.*leave --config out"):
            load_config(write(tmp_path, text))


# ---- flat and replace ---------------------------------------------------------------------------
def _leaf_count(tp) -> int:
    n = 0
    for f in dataclasses.fields(tp):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, dict):  # on_gpu: a mapping of overrides, one flat key per override
            continue
        n += _leaf_count(type(default)) if dataclasses.is_dataclass(default) else 1
    return n


def test_flat_has_one_dotted_key_per_leaf():
    cfg = load_config(overrides=["augment.view2.blur_prob=0.3", "optim.epochs=9"])
    flat = cfg.flat()
    assert len(flat) == _leaf_count(Config)
    assert flat["optim.epochs"] == 9
    assert flat["augment.view2.blur_prob"] == 0.3
    assert flat["augment.view1.blur_prob"] == 1.0
    assert flat["augment.view1.crop_scale"] == [0.08, 1.0]
    assert flat["model.backbone"] == "resnet18"
    assert not any(isinstance(v, dict) for v in flat.values())
    assert all(k.count(".") >= 1 for k in flat)
    assert sum(k.startswith("augment.view1.") for k in flat) == len(dataclasses.fields(ViewConfig))
    gpu = cfg.replace({"on_gpu": {"model.width": 64, "run.precision": "bf16"}}).flat()
    assert len(gpu) == len(flat) + 2 and gpu["on_gpu.model.width"] == 64 and gpu["model.width"] == 32


def test_replace_returns_a_new_validated_config():
    cfg = Config()
    new = cfg.replace({"optim.epochs": 3, "augment.view2.blur_prob": 0.5, "model.width": "8"})
    assert (new.optim.epochs, new.augment.view2.blur_prob, new.model.width) == (3, 0.5, 8)
    assert cfg.optim.epochs == 100 and cfg.augment.view2.blur_prob == 0.1  # original untouched
    with pytest.raises(ConfigError, match="optim.tau_base"):
        cfg.replace({"optim.tau_base": 1.5})
    with pytest.raises(ConfigError, match="optim.nope"):
        cfg.replace({"optim.nope": 1})


def test_the_gpu_recipe_applies_on_gpus_only_and_the_command_line_wins_over_it(tmp_path):
    path = write(tmp_path, "model: {width: 16}\non_gpu: {model.width: 64, optim.batch_size: 512}\n")
    cfg = load_config(path, ["optim.batch_size=128"])
    assert cfg.on_gpu == {"model.width": 64}  # the command line's key left the recipe
    assert apply_gpu_recipe(cfg, "cpu") is cfg
    gpu = apply_gpu_recipe(cfg, "cuda")
    assert (gpu.model.width, gpu.optim.batch_size, gpu.run.device, gpu.on_gpu) == (64, 128, "cuda", {})
    assert (cfg.model.width, cfg.run.device) == (16, "auto")  # original untouched


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.gpus_per_worker=0.5", "run.num_workers=2", "optim.batch_size=8"], "NCCL cannot put two ranks"),
        (["run.gpus_per_worker=1.5"], "Ray shares a GPU only in fractions below 1"),
        (["run.gpus_per_worker=2.25", "run.num_workers=1"], "Ray shares a GPU only in fractions below 1"),
    ],
)
def test_a_gpu_is_shared_in_fractions_below_1_by_one_worker_runs_only(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=r"run\.gpus_per_worker.*" + message):
        load_config(None, overrides)
    # The same rules hold for the GPU recipe, checked at load time on a CPU machine too.
    recipe = write(tmp_path, "on_gpu: {run.gpus_per_worker: 0.25}\n")
    with pytest.raises(ConfigError, match=r"on_gpu.*NCCL cannot put two ranks"):
        load_config(recipe, ["run.num_workers=2"])
    for ok in (["run.gpus_per_worker=0.25"], ["run.gpus_per_worker=2", "run.num_workers=2"], ["run.gpus_per_worker=1"]):
        load_config(None, ok)


# ---- error paths --------------------------------------------------------------------------------
# (id, how the bad value is given, payload, a field name the message must contain)
ERRORS = [
    ("tau>1", "override", ["optim.tau_base=1.5"], "optim.tau_base"),
    ("tau<0", "yaml", "optim:\n  tau_base: -0.1\n", "optim.tau_base"),
    ("batch<2", "override", ["optim.batch_size=1"], "optim.batch_size"),
    ("batch0", "dict", {"optim": {"batch_size": 0}}, "optim.batch_size"),
    ("unknown-op", "override", ["augment.ops=crop,sharpen"], "augment.ops"),
    ("unknown-op-yaml", "yaml", "augment:\n  ops: [crop, mixup]\n", "augment.ops"),
    ("duplicate-op", "override", ["augment.ops=crop,crop"], "augment.ops"),
    ("unknown-backbone", "override", ["model.backbone=resnet101"], "model.backbone"),
    ("unknown-stem", "yaml", "model:\n  stem: cifar\n", "model.stem"),
    ("unknown-target-bn", "override", ["model.target_bn=mean"], "model.target_bn"),
    ("unknown-dataset", "override", ["data.dataset=mnist"], "data.dataset"),
    ("unknown-optimizer", "override", ["optim.optimizer=adam"], "optim.optimizer"),
    ("negative-epochs", "override", ["optim.epochs=-1"], "optim.epochs"),
    ("gpus-on-cpu", "override", ["run.device=cpu", "run.gpus_per_worker=1"], "run.gpus_per_worker"),
    ("negative-epochs-dict", "dict", {"optim": {"epochs": -3}}, "optim.epochs"),
    ("unknown-top-yaml", "yaml", "optimizer:\n  epochs: 3\n", "optimizer"),
    ("unknown-nested-yaml", "yaml", "model:\n  depth: 3\n", "model.depth"),
    ("unknown-view-key-yaml", "yaml", "augment:\n  view1:\n    sharpness: 0.1\n", "augment.view1.sharpness"),
    ("unknown-top-override", "override", ["foo=1"], "foo"),
    ("unknown-section-override", "override", ["foo.bar=1"], "foo"),
    ("unknown-nested-override", "override", ["model.depth=3"], "model.depth"),
    ("unknown-view-override", "override", ["augment.view3.blur_prob=0.1"], "augment.view3"),
    ("unknown-view-key-override", "override", ["augment.view2.sharpness=0.1"], "augment.view2.sharpness"),
    ("unknown-nested-dict", "dict", {"optim": {"lr": 0.1}}, "optim.lr"),
    ("str-for-int", "override", ["optim.epochs=abc"], "optim.epochs"),
    ("str-for-int-yaml", "yaml", "optim:\n  batch_size: abc\n", "optim.batch_size"),
    ("fraction-for-int", "override", ["optim.epochs=2.5"], "optim.epochs"),
    ("bool-for-int", "override", ["model.width=true"], "model.width"),
    ("str-for-float", "override", ["optim.base_lr=abc"], "optim.base_lr"),
    ("nan-float", "override", ["optim.base_lr=.nan"], "optim.base_lr"),
    ("str-for-bool", "override", ["model.use_predictor=maybe"], "model.use_predictor"),
    ("str-for-pair", "override", ["augment.view1.crop_scale=0.5"], "augment.view1.crop_scale"),
    ("str-for-pair-yaml", "yaml", "augment:\n  view2:\n    blur_sigma: wide\n", "augment.view2.blur_sigma"),
    ("short-pair", "override", ["augment.view1.crop_scale=[0.5]"], "augment.view1.crop_scale"),
    ("number-for-list", "override", ["augment.ops=5"], "augment.ops"),
    ("mapping-for-list", "yaml", "augment:\n  ops: {crop: 1}\n", "augment.ops"),
    ("list-for-str", "yaml", "run:\n  name: [a, b]\n", "run.name"),
    ("scalar-for-section", "yaml", "model: 3\n", "model"),
    ("scalar-for-view", "override", ["augment.view1=3"], "augment.view1"),
    ("prob>1", "override", ["augment.view2.blur_prob=1.5"], "augment.view2.blur_prob"),
    ("prob<0", "yaml", "augment:\n  view1:\n    flip_prob: -0.1\n", "augment.view1.flip_prob"),
    ("solarize-prob>1", "override", ["augment.view2.solarize_prob=2"], "augment.view2.solarize_prob"),
    ("crop-low>high", "override", ["augment.view1.crop_scale=[0.9,0.2]"], "augment.view1.crop_scale"),
    ("crop-high>1", "override", ["augment.view2.crop_scale=[0.2,1.5]"], "augment.view2.crop_scale"),
    ("ratio-low>high", "override", ["augment.view1.crop_ratio=[1.5,0.5]"], "augment.view1.crop_ratio"),
    (
        "micro-batch<2",
        "override",
        ["optim.batch_size=8", "optim.accumulate_steps=2", "run.num_workers=4"],
        "optim.batch_size",
    ),
    ("width-not-multiple-of-4", "override", ["model.width=6"], "model.width"),
    ("bad-run-name", "override", ["run.name=a/b"], "run.name"),
    (
        "system-metrics-interval<0.5",
        "override",
        ["tracking.system_metrics_interval_s=0"],
        "tracking.system_metrics_interval_s",
    ),
    ("override-without-equals", "override", ["optim.epochs"], "optim.epochs"),
]


@pytest.mark.parametrize("kind, payload, field", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_invalid_config_raises_config_error_naming_the_field(tmp_path, kind, payload, field):
    with pytest.raises(ConfigError) as ei:
        if kind == "override":
            load_config(None, payload)
        elif kind == "yaml":
            load_config(write(tmp_path, payload))
        else:
            Config.from_dict(payload)
    assert field in str(ei.value), str(ei.value)


FILE_ERRORS = [
    ("missing", None),
    ("invalid-yaml", "model: [1, 2\n"),
    ("invalid-yaml-tabs", "model:\n\twidth: 8\n"),
    ("not-a-mapping", "- a\n- b\n"),
    ("scalar", "42\n"),
]


@pytest.mark.parametrize("text", [e[1] for e in FILE_ERRORS], ids=[e[0] for e in FILE_ERRORS])
def test_bad_yaml_file_raises_config_error_naming_the_file(tmp_path, text):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(path) in str(ei.value), str(ei.value)


def test_config_error_is_a_value_error():
    # The CLI maps ConfigError to exit code 2; callers that only know ValueError still catch it.
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["run.precision=fp16", "run.device=cuda"], "run.precision"),
        (["data.stream=true"], "data.stream"),  # fashion_mnist is in memory
        (["data.dataset=folder", "data.stream=true"], "data.stream"),  # final evaluation still on
        (
            ["data.dataset=folder", "data.stream=true", "eval.final=false", "model.in_channels=1"],
            "model.in_channels",
        ),  # streamed folders are RGB
        (["data.loader=ray_data"], "data.loader"),  # Ray Data feeds streamed folders only
        (["data.loader=torch"], "data.loader"),
        (["run.compile=true", "run.compile_mode=everything"], "run.compile_mode"),
        (["run.compile=true", "run.compile_mode=graph", "run.device=cpu"], "run.compile_mode"),  # CUDA graphs
        (
            ["run.compile=true", "run.compile_mode=step", "run.device=cuda", "run.num_workers=2"],
            "run.compile_mode",
        ),  # one process's step, no DDP
    ],
)
def test_gpu_and_stream_options_are_validated(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)
    cfg = load_config(None, ["run.precision=bf16", "run.device=cuda", "run.compile=true"])
    assert cfg.run.precision == "bf16" and cfg.run.compile and cfg.run.compile_mode == "networks"
    for mode in ("graph", "step"):
        assert (
            load_config(None, ["run.compile=true", f"run.compile_mode={mode}", "run.device=cuda"]).run.compile_mode
            == mode
        )
    # The mode only matters with run.compile=true.
    assert not load_config(None, ["run.compile_mode=graph", "run.device=cpu"]).run.compile


def test_total_steps_fixes_the_plan_and_excludes_a_time_budget():
    assert load_config(None, ["optim.total_steps=7"]).optim.total_steps == 7
    with pytest.raises(ConfigError, match=r"optim\.total_steps: fixes the steps \(7\) while optim\.time_budget"):
        load_config(None, ["optim.total_steps=7", "optim.time_budget_minutes=3"])
    with pytest.raises(ConfigError, match=r"optim\.total_steps: must be >= 0"):
        load_config(None, ["optim.total_steps=-1"])


def test_a_worker_range_loads_from_yaml_and_the_command_line(tmp_path):
    from_yaml = load_config(write(tmp_path, "run:\n  num_workers: [2, 8]\n"), ["optim.batch_size=840"])
    from_cli = load_config(None, ["run.num_workers=[2,8]", "optim.batch_size=840"])
    for cfg in (from_yaml, from_cli):
        r = cfg.run
        assert (r.num_workers, r.min_workers, r.max_workers, r.elastic) == ((2, 8), 2, 8, True)
        assert list(r.group_sizes) == [2, 3, 4, 5, 6, 7, 8] and r.describe_workers() == "[2, 8]"
    # Saved as a list (checkpoints, MLflow params) and read back as the same range.
    assert from_cli.to_dict()["run"]["num_workers"] == [2, 8]
    assert Config.from_dict(from_cli.to_dict()).run.num_workers == (2, 8)
    # A number stays a fixed group, min = max.
    fixed = load_config(None, ["run.num_workers=2"]).run
    assert (fixed.num_workers, fixed.min_workers, fixed.max_workers, fixed.elastic) == (2, 2, 2, False)
    assert list(fixed.group_sizes) == [2] and fixed.describe_workers() == "2"
    assert load_config(None, ["run.num_workers=[3,3]", "optim.batch_size=96"]).run.group_sizes == range(3, 4)


@pytest.mark.parametrize(
    "value, said",
    [
        ("[0,2]", "must be >= 1 worker, got [0, 2]"),
        ("[3,2]", "needs max >= min, got [3, 2]"),
        ("[1.5,2]", "expected an integer or a list of 2 integers, got [1.5, 2]"),
        ("[1,2,4]", "expected an integer or a list of 2 integers, got [1, 2, 4]"),
        ("[1]", "expected an integer or a list of 2 integers, got [1]"),
        ("[true,2]", "expected an integer or a list of 2 integers"),
        ("two", "expected an integer or a list of 2 integers, got 'two'"),
        ("0", "must be >= 1 worker, got 0"),
    ],
)
def test_a_bad_worker_range_is_refused_at_load_time(value, said):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [f"run.num_workers={value}"])
    assert str(ei.value).startswith("run.num_workers: ") and said in str(ei.value), str(ei.value)


@pytest.mark.parametrize(
    "overrides, small, good",
    [
        # 4 images in 2 accumulation steps: 1 worker gets 2-image micro-batches, 2 workers 1-image ones.
        (["optim.batch_size=4", "optim.accumulate_steps=2", "run.num_workers=[1,2]"], "2", "[1,1]"),
        # 12 images over 2 x 3 and 2 x 4: 2 at size 3 (shares 4/4/4), but 1 at size 4.
        (["optim.batch_size=12", "optim.accumulate_steps=2", "run.num_workers=[2,4]"], "4", "[2,3]"),
    ],
)
def test_every_group_size_of_a_range_keeps_micro_batches_of_2(overrides, small, good):
    with pytest.raises(ConfigError) as ei:
        load_config(None, overrides)
    said = str(ei.value)
    assert said.startswith("optim.batch_size: ") and "at least 2 images" in said, said
    assert f"at size(s) {small} of run.num_workers" in said, said
    assert load_config(None, [*overrides[:-1], f"run.num_workers={good}"]).run.num_workers


def test_a_batch_that_no_group_size_divides_is_shared_unevenly():
    # The paper's 4096 over an elastic [2, 8]: 3, 5, 6 and 7 workers get shares one image apart.
    cfg = load_config(None, ["optim.batch_size=4096", "run.num_workers=[2,8]"])
    assert cfg.run.group_sizes == range(2, 9)
    assert load_config(None, ["optim.batch_size=10", "optim.accumulate_steps=3"]).optim.accumulate_steps == 3


def test_a_range_counts_as_several_workers_for_the_one_gpu_graph_modes():
    with pytest.raises(ConfigError, match=r"run\.compile_mode"):
        load_config(None, ["run.compile=true", "run.compile_mode=graph", "run.device=cuda", "run.num_workers=[1,2]"])
    assert load_config(None, ["run.compile=true", "run.compile_mode=graph", "run.device=cuda", "run.num_workers=[1,1]"])
