"""Nothing megatrain reads from a user's directory is executed: a pickled payload planted in every place a
checkpoint, saved model, Hugging Face dir or teacher cache is read never runs, and the refusal is one line.
A scan of the source tree keeps it so (no unpickling of input files)."""
import ast
import json
import os
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch

from megatrain.config import build_config
from megatrain.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = dict(arch="gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, max_seq_len=16)


class Payload:
    """Unpickling this writes the marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _raw_pickle(path, marker):
    path.write_bytes(pickle.dumps({"module": Payload(marker)}, protocol=2))


def _torch_pickle(path, marker):
    torch.save({"module": {"w": torch.zeros(1)}, "extra": Payload(marker)}, path)


def _legacy_checkpoint(d, marker, writer):
    """An older per-engine DeepSpeed checkpoint dir: megatrain.json + mp_rank_00_model_states.pt."""
    d.mkdir(parents=True)
    cfg = build_config({"model": MODEL}).model_dump(mode="json")
    (d / "megatrain.json").write_text(json.dumps({"config": cfg}))
    writer(d / "mp_rank_00_model_states.pt", marker)
    return d


def _hf_dir(d, marker, what):
    d.mkdir(parents=True)
    hf_cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_embd": 32,
              "n_layer": 1, "n_head": 2, "n_positions": 16, "n_inner": None, "layer_norm_epsilon": 1e-5,
              "tie_word_embeddings": True}
    if what == "config":
        _raw_pickle(d / "config.json", marker)
    else:
        (d / "config.json").write_text(json.dumps(hf_cfg))
    _raw_pickle(d / "pytorch_model.bin", marker)  # never read: only safetensors are
    if what == "weights":
        _raw_pickle(d / "model.safetensors", marker)
    return d


def _saved_model(d, marker, what):
    d.mkdir(parents=True)
    cfg = build_config({"model": MODEL}).model.model_dump(mode="json")
    if what == "yaml_tag":  # a YAML tag that would call os.system under an unsafe loader
        (d / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    else:
        import yaml
        (d / "config.yaml").write_text(yaml.safe_dump({"model": cfg}))
    _raw_pickle(d / "model.safetensors", marker)
    return d


def _layout_free(d, marker):
    d.mkdir(parents=True)
    _raw_pickle(d / "manifest.json", marker)
    return d


SOURCES = {
    "legacy_raw_pickle": lambda d, m: _legacy_checkpoint(d, m, _raw_pickle),
    "legacy_torch_save": lambda d, m: _legacy_checkpoint(d, m, _torch_pickle),
    "hf_config": lambda d, m: _hf_dir(d, m, "config"),
    "hf_weights": lambda d, m: _hf_dir(d, m, "weights"),
    "saved_model_weights": lambda d, m: _saved_model(d, m, "weights"),
    "saved_model_yaml_tag": lambda d, m: _saved_model(d, m, "yaml_tag"),
    "checkpoint_manifest": _layout_free,
}


def _init_from(path, tmp_path):
    from megatrain.weights import init_source
    init_source(build_config({"model": dict(MODEL, init_from=str(path))}).model)


def _prune_or_distill(path, tmp_path):  # prune.source, distill.teacher and distill.student share this reader
    from megatrain.weights.sources import load_model_state
    load_model_state(str(path))


def _evaluate(path, tmp_path):
    from megatrain.eval.ensemble import evaluate_checkpoint
    evaluate_checkpoint(build_config({"model": MODEL, "log": {"dir": str(tmp_path / "log")}}), str(path),
                        log=lambda s: None)


def _ensemble(path, tmp_path):
    from megatrain.eval.ensemble import load_member
    load_member(str(path))  # run_ensemble loads every eval.ensemble entry through this


def _finetune(path, tmp_path):
    from megatrain.interop.hf import HFSource, model_config_from_hf
    HFSource(str(path), model_config_from_hf(str(path)))


READERS = {"init_from": _init_from, "prune_distill": _prune_or_distill, "evaluate": _evaluate,
           "ensemble": _ensemble, "finetune": _finetune}
# the finetune reader takes HF dirs only; the others take every source kind
CASES = [(r, s) for r in READERS for s in SOURCES if r != "finetune" or s.startswith("hf_")]


@pytest.mark.parametrize("reader,source", CASES)
def test_planted_payload_never_runs_and_is_refused_in_one_line(tmp_path, reader, source):
    marker = tmp_path / "PWNED"
    path = SOURCES[source](tmp_path / "planted", marker)
    with pytest.raises(UserError) as err:
        READERS[reader](path, tmp_path)
    assert not marker.exists(), f"{reader} ran code from a planted {source}"
    assert "\n" not in str(err.value) and str(err.value)


def test_planted_teacher_cache_manifest(tmp_path):
    from megatrain.compress.teacher_cache import TeacherCache
    marker = tmp_path / "PWNED"
    (tmp_path / "cache").mkdir()
    _raw_pickle(tmp_path / "cache" / "manifest.json", marker)
    with pytest.raises(UserError) as err:
        TeacherCache(str(tmp_path / "cache"))
    assert not marker.exists() and "\n" not in str(err.value)


def test_a_plain_legacy_checkpoint_still_loads(tmp_path):
    """The restricted reader is not a blanket refusal: tensors-only .pt files load."""
    from megatrain.weights.sources import build_plain, load_model_state
    d = tmp_path / "ok"
    model_cfg = build_config({"model": MODEL}).model
    state = build_plain(model_cfg).state_dict()
    _legacy_checkpoint(d, None, lambda p, m: torch.save({"module": state}, p))
    _, loaded = load_model_state(str(d))
    assert set(loaded) == set(state)


def test_evaluate_launcher_refuses_a_planted_payload_in_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    path = SOURCES["legacy_raw_pickle"](tmp_path / "planted", marker)
    proc = subprocess.run([sys.executable, "launch/evaluate.py", f"--checkpoint.resume={path}",
                           f"--log.dir={tmp_path / 'log'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not marker.exists()
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- the source tree never unpickles input files ----------------------------------------------------------
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (f"{func.value.id}.{func.attr}" if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    else getattr(func, "id", getattr(func, "attr", "")))
            yield node, name, {k.arg: k.value for k in node.keywords}


def _is_const(node, value):
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str) -> list[str]:
    """The unpickling (or code-executing) loads in ``source``: torch.load without weights_only=True,
    pickle/dill/joblib/cloudpickle loads, np.load without allow_pickle=False, yaml.load/unsafe_load/full_load,
    and trust_remote_code=True."""
    found = []
    for node, name, kw in _calls(ast.parse(source)):
        where = f"line {node.lineno}: {name}"
        if name == "torch.load" and not _is_const(kw.get("weights_only"), True):
            found.append(where + " without weights_only=True")
        elif name.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve") and \
                name.split(".")[-1] in ("load", "loads", "Unpickler", "open"):
            found.append(where)
        elif name in ("np.load", "numpy.load") and not _is_const(kw.get("allow_pickle"), False):
            found.append(where + " without allow_pickle=False")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "pd.read_pickle"):
            found.append(where)
        if _is_const(kw.get("trust_remote_code"), True):
            found.append(f"line {node.lineno}: trust_remote_code=True")
    return found


def test_scanner_catches_what_it_forbids():
    # "yaml." + "load": the forbidden call is assembled, so a plain-text search of the tree finds no unsafe load
    bad = ("torch.load(p, weights_only=False)\ntorch.load(p)\npickle.loads(b)\nnp.load(p)\n" + "yaml." + "load(s)\n"
           "AutoModel.from_pretrained(p, trust_remote_code=True)\n")
    assert len(unsafe_loads(bad)) == 6
    assert unsafe_loads("torch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\nyaml.safe_load(s)\n") == []


def test_source_tree_has_no_unpickling_of_input_files():
    offenders = []
    for top in ("megatrain", "launch", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(ROOT)} {hit}" for hit in unsafe_loads(text)]
            if "weights_only=False" in text.replace(" ", ""):
                offenders.append(f"{path.relative_to(ROOT)}: weights_only=False")
    assert not offenders, "unpickling of input files (use megatrain/safe_io.py): " + "; ".join(offenders)
