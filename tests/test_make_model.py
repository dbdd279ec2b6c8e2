"""`baton make-model` writes checkpoints that Hugging Face `transformers` loads and runs.

transformers is the correctness oracle for the whole engine, so every checkpoint we
write must load there with no missing or re-initialised weights, and its tokenizer
must behave like the family's real one (bos, chat template, lossless round trip).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernels.checkpoint_writer import (  # noqa: E402
    OutputDirError,
    checkpoint_params,
    write_checkpoint,
    write_config_and_tokenizer,
)
from kernels.presets import PRESETS, UnknownPresetError, get_preset  # noqa: E402
from kernels.tokenizer_builder import _build_json, build_tokenizer  # noqa: E402

# CPU-sized presets (float32) are written and run whole; real shapes only as configs.
TINY = [n for n, p in PRESETS.items() if p.hf_config["torch_dtype"] == "float32"]
REAL = ["llama-3.1-8b", "qwen3-8b", "llama-3.1-70b"]  # published shapes (REAL_PARAMS)

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ça coûte 3,50 € — déjà vu? Grüße aus München; ¿Dónde está la estación?",
    "你好，世界！東京の桜はきれいです。서울 🌸",
    "emoji: 🚀🎉 👩‍💻 👍🏽 🇫🇷 ❤️\n\ttabs, \r\nCRLF,   runs of  spaces ",
    'def f(x):\n    return {"a": [1, 2.5e-3, None]}  # code',
    "\u0000 control \u200b zero-width \U0001f9ea rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
# Special-token text typed by a user still round-trips (as special ids, as in the real ones).
SPECIALS_TEXT = "<|eot_id|> <|im_end|> [INST] <s> literal specials in user text"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Tell me more"},
]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        name: write_checkpoint(name, tmp_path_factory.mktemp(name), seed=0, progress=False)
        for name in TINY
    }


def _load(path: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", TINY)
def test_transformers_loads_and_generates(tiny_dirs: dict[str, Path], name: str) -> None:
    path, hf = tiny_dirs[name], get_preset(name).hf_config
    model = _load(path)
    assert type(model).__name__ == hf["architectures"][0]
    assert next(model.parameters()).dtype == torch.float32
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("The river had been rising for three days")["input_ids"]

    logits = _logits(model, ids)
    assert logits.shape == (len(ids), hf["vocab_size"])
    assert torch.isfinite(logits).all()
    # The init rule makes greedy decoding decisive: logits spread ~2.5 (untied) or more.
    assert logits.std(dim=-1).min() > 1.5

    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(ids)
    assert torch.equal(out[0, len(ids)], logits[-1].argmax())
    assert isinstance(tok.decode(out[0]), str)


@pytest.mark.parametrize("name", TINY)
def test_tokenizer_round_trips_and_specials(tiny_dirs: dict[str, Path], name: str) -> None:
    family = get_preset(name).family
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dirs[name])
    config = json.loads((tiny_dirs[name] / "config.json").read_text())
    assert len(tok) == config["vocab_size"]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        with_bos = tok.encode(text)
        if family == "qwen":
            assert with_bos == ids and config["bos_token_id"] is None
        else:
            assert with_bos == [config["bos_token_id"], *ids]
            assert tok.decode(with_bos, skip_special_tokens=True) == text
    ids = tok.encode(SPECIALS_TEXT, add_special_tokens=False)
    assert tok.decode(ids) == SPECIALS_TEXT
    # A random model can emit any id; each must decode without error.
    assert all(isinstance(tok.decode([i]), str) for i in range(config["vocab_size"]))
    eos = config["eos_token_id"]
    generation = json.loads((tiny_dirs[name] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == (eos if isinstance(eos, list) else [eos])
    assert generation["do_sample"] is False


@pytest.mark.parametrize("name", TINY)
def test_chat_template(tiny_dirs: dict[str, Path], name: str) -> None:
    family = get_preset(name).family
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dirs[name])
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = {
        "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTell me more<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "qwen": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there"
        "<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n"
        "Tell me more<|im_end|>\n<|im_start|>assistant\n",
        "mistral": "<s>[INST] You are terse.\n\nHi there [/INST] Hello.</s>"
        "[INST] Tell me more [/INST]",
    }[family]
    assert text == expected
    ids = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert tok.decode(ids) == expected  # no doubled bos, specials are single ids
    assert (
        tok.eos_token == {"llama3": "<|eot_id|>", "qwen": "<|im_end|>", "mistral": "</s>"}[family]
    )
    # Baton's own rendering (what the router runs) gives transformers' text and ids, from a
    # template compiled once and reused by later requests.
    from engine.tokenizer import TokenizerBundle

    ours = TokenizerBundle.from_dir(tiny_dirs[name])
    assert ours.apply_chat_template(MESSAGES) == expected
    compiled = ours._compiled_template()
    assert ours.chat_prompt_ids(MESSAGES) == ids
    assert ours._compiled_template() is compiled


def test_chat_template_errors_are_bad_requests(tiny_dirs: dict[str, Path]) -> None:
    from engine.errors import InvalidRequestError
    from engine.tokenizer import TokenizerBundle

    ours = TokenizerBundle.from_dir(tiny_dirs[TINY[0]])
    ours.chat_template = "{{ raise_exception('roles must alternate') }}"  # recompiled
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        ours.apply_chat_template(MESSAGES)
    ours.chat_template = "{% if %}"
    with pytest.raises(InvalidRequestError, match="chat template failed"):
        ours.apply_chat_template(MESSAGES)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = write_checkpoint("tiny-qwen3", tmp_path / "a", seed=7, progress=False)
    b = write_checkpoint("tiny-qwen3", tmp_path / "b", seed=7, progress=False)
    c = write_checkpoint("tiny-qwen3", tmp_path / "c", seed=8, progress=False)
    for fname in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (a / fname).read_bytes() == (b / fname).read_bytes(), fname
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tokenizer_training_is_deterministic() -> None:
    # Retrain (not the per-process cache): the trainer's hash maps get fresh random seeds.
    first = build_tokenizer("mistral", 1024)[0].to_str()
    _build_json.cache_clear()
    assert build_tokenizer("mistral", 1024)[0].to_str() == first


def test_sharded_checkpoint_loads_to_same_logits(tiny_dirs: dict[str, Path], tmp_path: Path):
    name = "tiny-llama-untied"
    sharded = write_checkpoint(name, tmp_path / "s", shard_size_bytes=200_000, progress=False)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    hf = get_preset(name).hf_config
    specs = checkpoint_params(hf)
    assert set(index["weight_map"]) == {s.name for s in specs}
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == 4 * sum(torch.Size(s.shape).numel() for s in specs)

    ids = [1, 100, 200, 300, 1000]
    assert torch.equal(_logits(_load(sharded), ids), _logits(_load(tiny_dirs[name]), ids))

    # Rewriting unsharded into the same folder removes the stale shards.
    write_checkpoint(name, sharded, progress=False)
    assert not list(sharded.glob("model-*")) and (sharded / "model.safetensors").exists()


def test_refuses_to_clobber_foreign_dirs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(OutputDirError, match="non-empty"):
        write_checkpoint("tiny-llama", tmp_path, progress=False)
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(OutputDirError):
        write_checkpoint("tiny-llama", real, progress=False)
    with pytest.raises(OutputDirError, match="not a directory"):
        write_checkpoint("tiny-llama", tmp_path / "notes.txt", progress=False)


def test_unknown_preset_lists_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownPresetError) as err:
        write_checkpoint("llama-9000", tmp_path / "x", progress=False)
    assert isinstance(err.value, ValueError)
    for name in PRESETS:
        assert name in str(err.value)
    assert not (tmp_path / "x").exists()


# Parameter counts of the published models, as a check of every shape we emit.
REAL_PARAMS = {"llama-3.1-8b": 8_030_261_248, "qwen3-8b": 8_190_735_360,
               "llama-3.1-70b": 70_553_706_496}  # fmt: skip


@pytest.mark.parametrize("name", REAL)
def test_real_shape_configs(tmp_path: Path, name: str) -> None:
    hf = write_config_and_tokenizer(name, tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(config).__name__ == hf["architectures"][0].replace("ForCausalLM", "Config")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):  # fmt: skip
        assert getattr(config, key) == hf[key], key
    assert config.dtype == torch.bfloat16
    assert config.head_dim == 128
    rope = config.rope_parameters
    assert rope["rope_theta"] == hf["rope_theta"]
    if name.startswith("llama"):
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
        assert rope["original_max_position_embeddings"] == 8192
    assert sum(torch.Size(s.shape).numel() for s in checkpoint_params(hf)) == REAL_PARAMS[name]

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == hf["vocab_size"]
    assert tok.decode([hf["vocab_size"] - 1]).startswith("<|reserved_")
    assert tok.decode(tok.encode("Grüße 👋 你好", add_special_tokens=False).ids) == "Grüße 👋 你好"
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("name", TINY)
def test_engine_agrees_on_names_and_shapes(tiny_dirs: dict[str, Path], name: str) -> None:
    """The engine lists parameters independently (to load and to fill dummy weights)."""
    from kernels.config import ModelConfig
    from kernels.models import hf_param_names

    cfg = ModelConfig.from_dir(tiny_dirs[name])
    specs = checkpoint_params(get_preset(name).hf_config)
    assert hf_param_names(cfg) == {s.name: s.shape for s in specs}
    assert cfg.num_params() == sum(torch.Size(s.shape).numel() for s in specs)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & later, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
TOOL_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 °C, sunny"},
]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_chat_template_with_tools_renders_as_transformers_does(tiny_dirs: dict[str, Path],
                                                              name: str) -> None:
    """The Llama 3 and ChatML templates list tools, show an assistant's call and a tool's
    result (router/tools.py reads replies in the same formats); Baton renders them as
    transformers does, JSON included (its `tojson`: no HTML escaping)."""
    from engine.tokenizer import TokenizerBundle

    tok = transformers.AutoTokenizer.from_pretrained(tiny_dirs[name])
    ours = TokenizerBundle.from_dir(tiny_dirs[name])
    for messages in (TOOL_TURNS, TOOL_TURNS[1:2]):
        expected = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                           add_generation_prompt=True)
        assert ours.apply_chat_template(messages, tools=TOOLS) == expected
        assert '"Weather <now> & later, in °C"' in expected
    assert "get_weather" in expected and "Paris" in ours.apply_chat_template(TOOL_TURNS,
                                                                             tools=TOOLS)
    # without tools, the same text as before tools were supported
    assert ours.apply_chat_template(MESSAGES, tools=None) == ours.apply_chat_template(MESSAGES)
