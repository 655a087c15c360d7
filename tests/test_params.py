"""params.yaml is read once and fails early, naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.errors import ParamsError, UserError
from pipeline.params import flatten, load_params, parse_params
from tests.factory import project_params

ROOT = Path(__file__).resolve().parents[1]


def test_the_projects_params_yaml_is_valid_and_holds_every_key():
    p = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert flatten(p) == {f"{s}.{k}": v for s, keys in raw.items() for k, v in keys.items()}
    del raw["pretrain"]["knn_k"]  # no default in the code: params.yaml is the one place
    with pytest.raises(ParamsError, match=r"^pretrain\.knn_k: missing"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"val_fration": 0.1}}, "data.val_fration: unknown key; allowed: source, root"),
        ({"dataa": {}}, "dataa: unknown key; allowed: data, model"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction: Input should be less than 1, got"),
        ({"data": {"val_fraction": "lots"}}, "data.val_fraction: Input should be a valid number"),
        ({"data": {"workers": 1.5}}, "data.workers: Input should be a valid integer, got 1.5"),
        ({"data": {"workers": True}}, "data.workers: Input should be a valid integer, got True"),
        ({"data": {"source": "mnist"}}, "data.source: Input should be 'fashion-mnist', 'idx'"),
        ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "data.test_fraction: val_fr"),
        ({"data": {"class_names": ["a", "a"]}}, "data.class_names: must be a non-empty list"),
        ({"data": {"class_names": "abc"}}, "data.class_names: Input should be a valid list"),
        ({"model": {"name": "vit_giant"}}, "model.name: unknown model 'vit_giant'"),
        ({"linprobe": {"warmup_epochs": 61}}, "linprobe.warmup_epochs: must be in [0, epochs]"),
        ({"tracking": {"experiment": " "}}, "tracking.experiment: must not be empty"),
        ({"tracking": {"register": "lab/a"}}, "tracking.register: 'lab/a': MLflow's model names"),
        ({"tracking": {"register": "lab:a"}}, "tracking.register: 'lab:a': MLflow's model names"),
        ({"tracking": {"register": ".."}}, "tracking.register: '..': MLflow refuses model names"),
    ],
)
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ParamsError) as err:
        parse_params(project_params(raw))
    assert str(err.value).startswith(message), str(err.value)


def test_a_section_that_is_no_mapping_is_named():
    raw = project_params()
    raw["data"] = 3
    with pytest.raises(ParamsError, match=r"^data: Input should be a valid dictionary"):
        parse_params(raw)
    with pytest.raises(UserError, match="expected sections of keys"):
        parse_params([1, 2])


def test_values_are_typed_and_frozen():
    raw = {"data": {"val_fraction": 0, "channels": 3, "class_names": ["x", "y"]}}
    p = parse_params(project_params(raw))
    assert p.data.val_fraction == 0.0 and isinstance(p.data.val_fraction, float)
    assert p.data.channels == "3" and p.data.class_names == ["x", "y"]
    with pytest.raises(ValidationError):
        p.data.seed = 3


def test_file_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"params file not found: .*nope.yaml"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  root: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml: invalid YAML at line"):
        load_params(bad)


def test_cli_reports_a_bad_key_in_one_line_and_exits_non_zero(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(project_params({"data": {"val_fraction": 1.2}})))
    script = Path(sys.executable).with_name("mae-cli")
    result = subprocess.run(
        [str(script), "shard", "--params", str(params)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"mae-cli: error: data.val_fraction: Input should be less than 1, got 1.2 (in {params})"
    )
    assert not (tmp_path / "data").exists()


def test_the_gpu_recipe_is_valid_and_becomes_dvc_set_arguments(tmp_path):
    from pipeline.tools.recipe import overrides

    args = overrides(ROOT / "recipes/fashion-mnist-gpu.yaml", ROOT / "params.yaml")
    assert "model.name=mae_vit_s_patch4_28" in args and "runtime.compile=false" in args
    assert "runtime.nproc=auto" in args and "pretrain.blr=0.0003" in args
    assert "data.in_memory=auto" in args
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: {epoch: 3}\n")
    with pytest.raises(UserError, match=r"bad.yaml: pretrain.epoch: unknown key"):
        overrides(bad, ROOT / "params.yaml")


@pytest.mark.parametrize(("value", "ok"), [("auto", True), (2, True), (0, False), ("all", False)])
def test_runtime_nproc_is_auto_or_a_positive_count(value, ok):
    raw = project_params({"runtime": {"nproc": value}})
    if ok:
        assert parse_params(raw).runtime.nproc == value
    else:
        with pytest.raises(ParamsError, match=r"runtime\.nproc"):
            parse_params(raw)


def test_reading_params_imports_neither_torch_nor_timm():
    """`mae-cli shard`, `ui` and `compare` never train: their params check stays light."""
    code = (
        "import sys; from pipeline.params import load_params; load_params('params.yaml'); "
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("runtime.compile", True, True),
        ("runtime.compile", "reduce-overhead", True),
        ("runtime.compile", "max-autotune", True),
        ("runtime.compile", "fast", False),
        ("data.in_memory", "auto", True),
        ("data.in_memory", False, True),
        ("data.in_memory", "yes", False),
        ("pretrain.mask_type", "block", True),
        ("pretrain.mask_type", "blocks", False),
        ("finetune.trainable_blocks", None, True),
        ("finetune.trainable_blocks", -1, False),
        ("model.decoder_depth", 0, False),
    ],
)
def test_switches_that_take_a_bool_or_a_named_choice(key, value, ok):
    section, name = key.split(".")
    raw = project_params({section: {name: value}})
    if ok:
        assert getattr(getattr(parse_params(raw), section), name) == value
    else:
        with pytest.raises(UserError, match=rf"^{key}: "):
            parse_params(raw)


def test_numbers_dvc_writes_back_load_as_numbers(tmp_path):
    """`dvc exp run -S finetune.min_lr=0.000001` rewrites params.yaml with DVC's YAML 1.2
    dumper: `min_lr: 1e-06`, a string to YAML 1.1. Written here by DVC's own code."""
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(project_params()))
    with modify_yaml(path) as raw:
        raw["finetune"]["min_lr"] = 0.000001
        raw["pretrain"]["weight_decay"] = 0.00005
        raw["linprobe"]["blr"] = 1e20
    text = path.read_text()
    assert "min_lr: 1e-06" in text and "weight_decay: 5e-05" in text  # what DVC writes
    p = load_params(path)
    assert p.finetune.min_lr == 1e-6 and p.pretrain.weight_decay == 5e-5
    assert p.linprobe.blr == 1e20


@pytest.mark.parametrize(
    ("text", "value"),
    [("1E-5", 1e-5), ("+2e3", 2000.0), (".5", 0.5), ("5.", 5.0), ("1.0e-6", 1e-6), ("3", 3)],
)
def test_every_yaml_1_1_or_1_2_number_loads_as_a_number_and_a_quoted_one_does_not(
    tmp_path, text, value
):
    path = tmp_path / "params.yaml"
    params = yaml.safe_dump(project_params(), sort_keys=False)
    params = params.replace("min_lr: 0.0\n", f"min_lr: {text}\n", 1)  # pretrain.min_lr
    path.write_text(params)
    assert load_params(path).pretrain.min_lr == value
    path.write_text(params.replace(f"min_lr: {text}\n", f"min_lr: '{text}'\n", 1))
    with pytest.raises(ParamsError, match=r"^pretrain.min_lr: Input should be a valid number"):
        load_params(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"pretrain": {"mask_ratio": 0.0}}, "pretrain.mask_ratio: 0.0 masks none of the 16"),
        ({"pretrain": {"mask_ratio": 0.95}}, "pretrain.mask_ratio: mask_ratio 0.95 leaves no"),
        ({"finetune": {"cutmix": 1.0, "batch_size": 7}}, "finetune.batch_size: 7 is odd"),
        ({"linprobe": {"batch_size": 1}}, "linprobe.batch_size: 1: the probe's BatchNorm"),
        ({"pretrain": {"knn_bank": 10}}, "pretrain.knn_k: 20 neighbours, but the k-NN bank"),
        (
            {"pretrain": {"mask_type": "grid", "mask_ratio": 0.5}},
            "pretrain.mask_type: grid with pretrain.mask_ratio: grid masking keeps one patch",
        ),
        (
            {"model": {"name": "mae_vit_s_patch4_28"}, "pretrain": {"mask_type": "grid"}},
            "pretrain.mask_type: grid with pretrain.mask_ratio: grid masking at mask_ratio "
            "0.75 keeps one patch of every 2x2 cell, which do not tile the 7x7 patch grid "
            "(model mae_vit_s_patch4_28)",
        ),
        ({"finetune": {"trainable_blocks": 5}}, "finetune.trainable_blocks: 5, but model"),
        (
            {"model": {"decoder_embed_dim": 50}},
            "model.decoder_embed_dim: decoder_embed_dim 50 is not divisible by "
            "decoder_num_heads 4 (model mae_vit_tiny_patch7_28)",
        ),
        (
            {"model": {"name": "mae_vit_test", "decoder_embed_dim": 6}},
            "model.decoder_embed_dim: decoder_embed_dim must be divisible by 4, got 6",
        ),
    ],
)
def test_values_that_cannot_train_together_are_refused_naming_the_key(raw, message):
    with pytest.raises(ParamsError) as err:
        parse_params(project_params(raw))
    assert str(err.value).startswith(message), str(err.value)


def test_values_near_those_limits_still_train():
    near = {
        "pretrain": {"mask_ratio": 0.01, "knn_bank": 20},  # 1 patch of 16 masked; k = bank
        "finetune": {"mixup": 0.8, "batch_size": 32},
        "linprobe": {"batch_size": 2},
    }
    assert parse_params(project_params(near)).pretrain.mask_ratio == 0.01
    ablations = {
        "model": {"decoder_depth": 4, "decoder_embed_dim": 64},
        "pretrain": {"mask_type": "grid", "mask_ratio": 0.75},
        "finetune": {"trainable_blocks": 0},
    }
    assert parse_params(project_params(ablations)).finetune.trainable_blocks == 0
    assert parse_params(project_params({"pretrain": {"probe_every": 0, "knn_bank": 1}}))


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_is_valid_over_params_yaml(recipe):
    from pipeline.tools.recipe import overrides

    assert overrides(ROOT / "recipes" / recipe, ROOT / "params.yaml")
