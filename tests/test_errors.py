"""Every documented bad input raises the documented exception, and the process
survives to serve the next call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import random_ids

import selfextend_rs as se

pytestmark = pytest.mark.usefixtures("quiet_context")


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory_and_files(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(se.ModelLoadError, match="nope"):
        se.Model.load(tmp_path / "nope")
    for name in ["config.json", "tokenizer.json", "model.safetensors"]:
        broken = copy(model_path, tmp_path / f"no-{name}")
        (broken / name).unlink()
        with pytest.raises(se.ModelLoadError, match=name.split(".")[0]):
            se.Model.load(broken)


def test_a_file_instead_of_a_directory(model_path: Path) -> None:
    with pytest.raises(se.ModelLoadError, match="model directory"):
        se.Model.load(model_path / "config.json")


def test_invalid_json(tmp_path: Path, model_path: Path) -> None:
    broken = copy(model_path, tmp_path / "m")
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(se.ModelLoadError, match="config.json.*not valid JSON"):
        se.Model.load(broken)
    (broken / "tokenizer.json").write_text("{]")
    edit_target = copy(model_path, tmp_path / "t")
    (edit_target / "tokenizer.json").write_text("{]")
    with pytest.raises(se.ModelLoadError, match="tokenizer.json"):
        se.Model.load(edit_target)


def test_tokenizer_json_that_makes_tokenizers_panic(tmp_path: Path, model_path: Path) -> None:
    # Found by tests/fuzz: a control character in a key of the decoder object makes
    # `tokenizers` 0.22 unwrap a JSON error inside its deserializer.
    broken = copy(model_path, tmp_path / "m")
    text = (broken / "tokenizer.json").read_text()
    decoder = text.index('"decoder"')
    key = text.index('"use_regex"', decoder)
    (broken / "tokenizer.json").write_text(text[:key] + '"\x01x"' + text[key + len('"use_regex"'):])
    with pytest.raises(se.SelfExtendError, match="tokenizer.json") as raised:
        se.Model.load(broken)
    assert "internal error" not in str(raised.value)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"architectures": ["MistralForCausalLM"]}, "architecture 'MistralForCausalLM'"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"vocab_size": "many"}, "vocab_size|invalid type"),
    ],
)
def test_bad_config(tmp_path: Path, model_path: Path, changes, pattern) -> None:
    broken = copy(model_path, tmp_path / "m")
    edit_config(broken, **changes)
    with pytest.raises(se.ModelLoadError, match=pattern):
        se.Model.load(broken)


def test_missing_tensor_and_wrong_shape(tmp_path: Path, model_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(model_path / "model.safetensors"))
    broken = copy(model_path, tmp_path / "missing")
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(broken / "model.safetensors"))
    with pytest.raises(se.ModelLoadError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*not found"):
        se.Model.load(broken)

    broken = copy(model_path, tmp_path / "shape")
    w = dict(weights)
    w["model.layers.0.self_attn.k_proj.weight"] = w["model.layers.0.self_attn.k_proj.weight"][:16]
    save_file(w, str(broken / "model.safetensors"))
    with pytest.raises(se.ModelLoadError, match=r"k_proj\.weight.*model\.safetensors.*expected shape \[32, 64\], found \[16, 64\]"):
        se.Model.load(broken)


def test_truncated_and_corrupt_safetensors(tmp_path: Path, model_path: Path) -> None:
    data = (model_path / "model.safetensors").read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "tiny": data[:5],
        "garbage-header": (100).to_bytes(8, "little") + b"x" * 200,
        "huge-header": (1 << 60).to_bytes(8, "little") + data[8:],
        "empty": b"",
    }
    for name, blob in cases.items():
        broken = copy(model_path, tmp_path / name)
        (broken / "model.safetensors").write_bytes(blob)
        with pytest.raises(se.ModelLoadError, match="model.safetensors"):
            se.Model.load(broken)


def test_bad_shard_index(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    broken = copy(checkpoints["llama3"], tmp_path / "m")
    (broken / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    with pytest.raises(se.ModelLoadError, match="weight_map"):
        se.Model.load(broken)
    (broken / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(se.ModelLoadError, match="weight_map"):
        se.Model.load(broken)


def test_unknown_device_and_dtype(model_path: Path) -> None:
    with pytest.raises(se.InvalidArgumentError, match="unknown device 'tpu'"):
        se.Model.load(model_path, device="tpu")
    if not se.cuda_available():
        with pytest.raises(se.InvalidArgumentError, match="compiled without cuda|could not be opened"):
            se.Model.load(model_path, device="cuda:0")
    with pytest.raises(se.InvalidArgumentError, match="cuda:99"):
        se.Model.load(model_path, device="cuda:99")
    with pytest.raises(ValueError, match="unknown dtype 'f8'"):
        se.Model.load(model_path, dtype="f8")


def test_bad_call_arguments(model: se.Model) -> None:
    vocab = model.config.vocab_size
    ids = random_ids(10, vocab)
    bad_calls = [
        (lambda: model.generate(""), "prompt.*empty"),
        (lambda: model.generate([]), "prompt.*empty"),
        (lambda: model.logits([]), "token_ids.*empty"),
        (lambda: model.logits([vocab]), f"id {vocab} at index 0 is out of range"),
        (lambda: model.logits([-1]), "id -1"),
        (lambda: model.generate(ids + [vocab + 5]), "out of range"),
        (lambda: model.generate(ids, -1), "max_new_tokens.*>= 0"),
        (lambda: model.generate(ids, temperature=-0.5), "temperature"),
        (lambda: model.generate(ids, top_k=0), "top_k"),
        (lambda: model.generate(ids, top_p=0.0), "top_p"),
        (lambda: model.generate(ids, repetition_penalty=0.0), "repetition_penalty"),
        (lambda: model.generate(ids, seed=-3), "seed"),
        (lambda: model.generate(ids, stop=""), "stop"),
        (lambda: model.logits(ids, chunk_size=0), "chunk_size"),
        (lambda: se.SelfExtend(0, 16), "group_size.*>= 1, got 0"),
        (lambda: se.SelfExtend(4, 0), "window.*>= 1, got 0"),
        (lambda: se.SelfExtend(-2, 16), "group_size"),
        (lambda: model.tokenizer.decode([vocab]), "out of range"),
    ]
    for call, pattern in bad_calls:
        with pytest.raises(se.InvalidArgumentError, match=pattern):
            call()
    with pytest.raises(TypeError):
        model.generate(ids, self_extend=(4, 16))  # type: ignore[arg-type]
    # The model is unharmed.
    assert model.generate(ids, 3).finish_reason in ("eos", "length")


def test_requests_beyond_memory_fail_cleanly(model: se.Model) -> None:
    ids = random_ids(10, model.config.vocab_size)
    with pytest.raises(se.OutOfMemoryError, match="tokens would fit"):
        model.generate(ids, max_new_tokens=10**13)
    assert model.generate(ids, 2).prompt_tokens == 10
