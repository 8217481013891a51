"""Config tree: round-trip, overrides, derived layout, DeepSpeed dict, and each validation message."""
import json

import pytest
import yaml

from megatrain.config import (ConfigError, build_config, dump_config, load_config, merge_user_deepspeed,
                              parse_overrides, resolve_layout, to_deepspeed)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("recipes/tiny_cpu_llama.yaml", ["--train.lr=1e-3", "--parallel.zero_stage=2"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(str(path))
    assert again == cfg
    assert again.train.lr == 1e-3 and again.parallel.zero_stage == 2


def test_override_typing_and_forms():
    got = parse_overrides(["--train.lr=1e-3", "--parallel.tp", "2", "--log.dir=runs/x", "--train.betas=[0.8,0.9]",
                           "--model.num_kv_heads=null", "--log.tensorboard=false"])
    assert got == {"train.lr": 1e-3, "parallel.tp": 2, "log.dir": "runs/x", "train.betas": [0.8, 0.9],
                   "model.num_kv_heads": None, "log.tensorboard": False}


@pytest.mark.parametrize("overrides, message", [
    (["--train.max_steps=0"], "train.max_steps: Input should be greater than 0"),
    (["--train.lr=fast"], "train.lr: Input should be a valid number"),
    (["--train.lrr=1"], "unknown config key 'train.lrr'"),
    (["--modle.arch=gpt2"], "unknown config key 'modle'"),
    (["--model.arch=bert"], "model.arch: Input should be"),
    (["--model.num_heads=3"], "model.hidden_size=128 is not divisible by model.num_heads=3"),
    (["--model.num_heads=4", "--model.num_kv_heads=3"], "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
    (["--train.min_lr=1", "--train.lr=0.1"], "train.min_lr=1.0 is above train.lr=0.1"),
    (["train.lr=1"], "overrides look like --section.key=value"),
    (["--train.lr"], "has no value"),
])
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_layout_derivation():
    cfg = build_config({"train": {"global_batch_size": 32, "micro_batch_size": 4}})
    lay = resolve_layout(cfg, 4)
    assert (lay.dp, lay.grad_accum) == (4, 2)
    cfg = build_config({"train": {"global_batch_size": 32, "micro_batch_size": 4}, "parallel": {"tp": 2}})
    assert (resolve_layout(cfg, 4).dp, resolve_layout(cfg, 4).grad_accum) == (2, 4)


@pytest.mark.parametrize("tree, world, message", [
    ({"train": {"global_batch_size": 12, "micro_batch_size": 4}}, 2, "train.global_batch_size=12 is not divisible by micro_batch_size*dp=4*2"),
    ({"parallel": {"tp": 3}}, 3, "parallel.tp=3 does not divide model.num_heads=4"),
    ({"parallel": {"tp": 2}}, 3, "does not divide world size 3"),
    ({"parallel": {"pp": 4}}, 4, "parallel.pp=4 exceeds model.num_layers=2"),
    ({"parallel": {"pp": 2, "zero_stage": 2}, "train": {"global_batch_size": 8}}, 2, "supports only ZeRO-0/1"),
    ({"parallel": {"pp": 2}, "train": {"global_batch_size": 4, "micro_batch_size": 4}}, 2, "gets only 1 micro-batches"),
    ({"parallel": {"sequence_parallel": True}}, 1, "sequence_parallel=true needs parallel.tp>1"),
    ({"parallel": {"dp": 3}}, 2, "parallel.dp=3 but world size 2"),
    ({"parallel": {"offload_optimizer": "cpu", "zero_stage": 0}}, 1, "needs parallel.zero_stage>=1"),
])
def test_layout_rejections(tree, world, message):
    with pytest.raises(ConfigError) as err:
        resolve_layout(build_config(tree), world)
    assert message in str(err.value)


def test_deepspeed_dict_and_user_merge(tmp_path):
    cfg = build_config({"train": {"global_batch_size": 16, "micro_batch_size": 4, "precision": "bf16"},
                        "parallel": {"zero_stage": 2, "offload_optimizer": "cpu"}})
    ds = to_deepspeed(cfg, resolve_layout(cfg, 2))
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    merged = merge_user_deepspeed(ds, {"zero_optimization": {"reduce_bucket_size": 1000}, "comms_logger": {"enabled": True}})
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000 and merged["comms_logger"]["enabled"]
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": 32}))
    cfg2 = build_config({**yaml.safe_load(dump_config(cfg)), "train": {**cfg.train.model_dump(mode="json"), "deepspeed_config": str(user)}})
    with pytest.raises(ConfigError, match="sets train_batch_size=32 but the megatrain config gives 16"):
        to_deepspeed(cfg2, resolve_layout(cfg2, 2))


@pytest.mark.parametrize("recipe", ["tiny_cpu_gpt", "tiny_cpu_llama", "gpt2_124m", "llama_1b"])
def test_recipes_validate(recipe):
    cfg = load_config(f"recipes/{recipe}.yaml")
    world = 8 if recipe in ("gpt2_124m", "llama_1b") else 2
    resolve_layout(cfg, world)
    if recipe == "llama_1b":
        cfg = load_config(f"recipes/{recipe}.yaml", ["--parallel.tp=2", "--parallel.pp=2"])
        assert resolve_layout(cfg, 8).dp == 2


def test_recipe_base_merges_and_rejects_cycles(tmp_path):
    (tmp_path / "parent.yaml").write_text("model: {arch: llama, num_layers: 4, hidden_size: 64}\n"
                                          "train: {lr: 1.0e-3, betas: [0.9, 0.95]}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../parent.yaml\nmodel: {num_layers: 2}\n"
                                                 "train: {betas: [0.8, 0.9]}\n")
    cfg = load_config(str(tmp_path / "sub" / "child.yaml"), ["--train.lr=2e-3"])
    # sections merge key by key; lists are replaced whole; overrides still win last
    assert (cfg.model.arch, cfg.model.num_layers, cfg.model.hidden_size) == ("llama", 2, 64)
    assert tuple(cfg.train.betas) == (0.8, 0.9) and cfg.train.lr == 2e-3
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base: of .*missing.yaml: no such file"):
        load_config(str(tmp_path / "c.yaml"))
