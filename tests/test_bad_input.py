"""Bad input gets a clear error that names the problem (the field, flag, file or tensor),
raised as a Baton error type without a chained library traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine.config import ConfigError, EngineConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels.checkpoint_writer import write_checkpoint
from kernels.config import SUPPORTED_ARCHITECTURES, ModelConfig
from kernels.errors import CheckpointError, UnsupportedArchitectureError
from kernels.presets import PRESETS, UnknownPresetError, get_preset

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"


def clean(exc: BaseException) -> BaseException:
    """The error stands alone: no library exception chained underneath it."""
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__
    return exc


@pytest.fixture(scope="module")
def tiny(checkpoint_dir) -> Path:
    return checkpoint_dir("tiny-llama")


@pytest.fixture
def copy(tiny: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint to break."""
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def load_error(path: Path, exc_type: type[Exception] = CheckpointError) -> str:
    with pytest.raises(exc_type) as info:
        LLM(str(path))
    return str(clean(info.value))


# Requests.


@pytest.fixture(scope="module")
def llm(tiny: Path) -> LLM:
    return LLM(str(tiny), num_kv_blocks=64)


def request_error(llm: LLM, prompt: list[int], params: SamplingParams) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([prompt], params)
    assert not llm.engine.has_unfinished()
    return clean(info.value)


def test_prompt_longer_than_context(tiny: Path) -> None:
    llm = LLM(str(tiny), num_kv_blocks=1024)
    ctx = llm.engine.model_config.max_position_embeddings
    e = request_error(llm, [5] * (ctx + 10), SamplingParams(max_tokens=1))
    assert f"maximum context length is {ctx} tokens" in str(e)
    assert f"{ctx + 10} in the prompt" in str(e)
    # The prompt fits, the completion does not.
    e = request_error(llm, [5] * (ctx - 4), SamplingParams(max_tokens=10))
    assert f"maximum context length is {ctx} tokens" in str(e) and e.param == "max_tokens"


def test_prompt_longer_than_max_model_len(tiny: Path) -> None:
    llm = LLM(str(tiny), max_model_len=64, num_kv_blocks=16)
    e = request_error(llm, [5] * 60, SamplingParams(max_tokens=8))
    assert "maximum context length is 64 tokens" in str(e)
    # A request that fits still runs on the same engine.
    assert len(llm.generate([[5] * 50], SamplingParams(max_tokens=8))[0].token_ids) == 8


def test_request_larger_than_the_kv_cache(tiny: Path) -> None:
    llm = LLM(str(tiny), num_kv_blocks=4, block_size=16)
    e = request_error(llm, [5] * 60, SamplingParams(max_tokens=8))
    assert "KV cache" in str(e) and "--kv-blocks 4" in str(e)


def test_bad_prompt_tokens(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    e = request_error(llm, [1, 2, vocab], SamplingParams())
    assert e.param == "prompt" and f"[0, {vocab})" in str(e)
    e = request_error(llm, [-1], SamplingParams())
    assert e.param == "prompt"
    e = request_error(llm, [], SamplingParams())
    assert e.param == "prompt" and "empty" in str(e)


@pytest.mark.parametrize(("kwargs", "param", "fragment"), [
    ({"max_tokens": 0}, "max_tokens", "at least 1, got 0"),
    ({"max_tokens": -5}, "max_tokens", "at least 1, got -5"),
    ({"temperature": -0.1}, "temperature", "must be >= 0"),
    ({"temperature": float("nan")}, "temperature", "got nan"),
    ({"top_p": 0.0}, "top_p", "(0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p", "(0, 1], got 1.5"),
    ({"top_p": -0.2}, "top_p", "got -0.2"),
    ({"top_k": -2}, "top_k", "got -2"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "[0, max_tokens=10], got 20"),
    ({"min_tokens": -1}, "min_tokens", "got -1"),
    ({"logprobs": 21}, "logprobs", "[0, 20], got 21"),
    ({"stop": ["ok", ""]}, "stop", "must not be empty"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2], got 2.5"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty", "got inf"),
])
def test_bad_sampling_params(kwargs: dict, param: str, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    e = clean(info.value)
    assert e.param == param
    assert str(e).startswith(param) and fragment in str(e)


def test_good_sampling_params_edges() -> None:
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, min_tokens=1,
                   logprobs=20)
    assert SamplingParams(stop="x").stop == ["x"]


# Presets and the CLI.


def test_unknown_preset_lists_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownPresetError) as info:
        get_preset("nope")
    msg = str(clean(info.value))
    assert "'nope'" in msg and all(name in msg for name in PRESETS)
    with pytest.raises(UnknownPresetError):
        write_checkpoint("nope", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnknownPresetError):
        LLM("nope", load_format="dummy")


def test_cli_unknown_preset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "make-model", "--preset", "nope", "--out",
         str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("baton make-model: error: unknown model preset 'nope'")
    assert "tiny-llama" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


# Model and checkpoint folders.


def test_model_path_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    msg = load_error(tmp_path / "missing", ConfigError)
    assert msg.startswith("--model:") and "missing" in msg
    (tmp_path / "empty").mkdir()
    msg = load_error(tmp_path / "empty")
    assert "config.json not found" in msg


def test_missing_safetensors_file(copy: Path) -> None:
    (copy / WEIGHTS).unlink()
    msg = load_error(copy)
    assert WEIGHTS in msg and str(copy) in msg


def test_missing_shard(tmp_path: Path) -> None:
    path = write_checkpoint("tiny-llama", tmp_path / "sharded", shard_size_bytes=200_000,
                            progress=False)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 3
    LLM(str(path), num_kv_blocks=8)  # complete: loads
    shards[1].unlink()
    msg = load_error(path)
    assert shards[1].name in msg and "missing shard" in msg
    assert shards[0].name not in msg


def test_broken_shard_index(tmp_path: Path) -> None:
    path = write_checkpoint("tiny-llama", tmp_path / "sharded", shard_size_bytes=200_000,
                            progress=False)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "model.safetensors.index.json" in load_error(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_safetensors(copy: Path, damage: str) -> None:
    f = copy / WEIGHTS
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                   "garbage": b"\x00not a safetensors file" * 50}[damage])
    msg = load_error(copy)
    assert str(f) in msg and "corrupt" in msg


def test_tensor_missing_from_checkpoint(copy: Path) -> None:
    tensors = load_file(copy / WEIGHTS)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, copy / WEIGHTS)
    msg = load_error(copy)
    assert "lacks tensors: model.layers.1.mlp.down_proj.weight" in msg


def test_tensor_with_wrong_shape(copy: Path) -> None:
    tensors = load_file(copy / WEIGHTS)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name][:32].contiguous()
    save_file(tensors, copy / WEIGHTS)
    msg = load_error(copy)
    assert name in msg and "(32, 64)" in msg and "(64, 64)" in msg


def test_unexpected_tensor(copy: Path) -> None:
    tensors = load_file(copy / WEIGHTS)
    tensors["model.layers.9.mlp.up_proj.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, copy / WEIGHTS)
    assert "unexpected tensor 'model.layers.9.mlp.up_proj.weight'" in load_error(copy)


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture(copy: Path) -> None:
    edit_config(copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError) as info:
        ModelConfig.from_dir(copy)
    msg = str(clean(info.value))
    assert "'GPT2LMHeadModel'" in msg
    assert all(arch in msg for arch in SUPPORTED_ARCHITECTURES)
    assert "GPT2LMHeadModel" in load_error(copy, UnsupportedArchitectureError)


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"hidden_size": None}, "lacks the field 'hidden_size'"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer, got 0"),
    ({"vocab_size": "big"}, "'vocab_size' must be a positive integer, got 'big'"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of "
                                 "num_key_value_heads=3"),
    ({"torch_dtype": "int8"}, "torch_dtype 'int8' is not supported"),
])
def test_bad_config_fields(copy: Path, changes: dict, fragment: str) -> None:
    edit_config(copy, **changes)
    msg = load_error(copy)
    assert fragment in msg and "config.json" in msg


@pytest.mark.parametrize("name", ["config.json", "generation_config.json",
                                  "tokenizer_config.json"])
def test_invalid_json(copy: Path, name: str) -> None:
    (copy / name).write_text("{not json")
    msg = load_error(copy)
    assert f"{name} is not valid JSON" in msg


def test_config_json_not_an_object(copy: Path) -> None:
    (copy / "config.json").write_text("[1, 2]")
    assert "expected a JSON object" in load_error(copy)


def test_bad_tokenizer_json(copy: Path) -> None:
    (copy / "tokenizer.json").write_text('{"version": "1.0"}')
    assert "tokenizer.json cannot be loaded" in load_error(copy)


# Engine flags.


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"block_size": 3}, "--block-size"),
    ({"block_size": 256}, "--block-size"),
    ({"num_kv_blocks": 0}, "--kv-blocks"),
    ({"max_num_seqs": 0}, "--max-num-seqs"),
    ({"max_num_batched_tokens": 0}, "--max-num-batched-tokens"),
    ({"max_model_len": 1}, "--max-model-len"),
    ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization"),
    ({"gpu_memory_utilization": 0.0}, "--gpu-memory-utilization"),
    ({"cpu_kv_cache_gb": 0.0}, "--cpu-kv-cache-gb"),
    ({"dtype": "int8"}, "--dtype"),
    ({"device": "tpu"}, "--device"),
    ({"load_format": "pickle"}, "--load-format"),
    ({"tp": 0}, "--tp"),
])
def test_bad_engine_config(tiny: Path, kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig(model=str(tiny), **kwargs)
    msg = str(clean(info.value))
    (value,) = kwargs.values()
    assert msg.startswith(f"{flag}: ") and msg.endswith(f"got {value!r}")
    assert isinstance(info.value, ValueError)  # argparse-style callers catch ValueError
    with pytest.raises(ConfigError, match=flag):
        LLM(str(tiny), **kwargs)
