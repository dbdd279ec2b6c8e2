"""Byte-level BPE tokenizers in the style of each model family, trained on a bundled corpus.

Random-weight checkpoints still need a real tokenizer: the router tokenizes prompts,
renders chat templates and detokenizes streams, and all of that must behave like it
does for Llama 3, Qwen or Mistral. Byte-level BPE without normalisation makes every
UTF-8 string round-trip exactly, which lets tests compare text as well as token ids.

Training is deterministic (the `tokenizers` BPE trainer breaks count ties by pair id),
so the same family and vocab size always give a byte-identical `tokenizer.json`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

MAX_TRAINED_VOCAB = 4096
"""Merges past this add little on a ~120 KB corpus; the rest of a big vocab is padding."""


@dataclass(frozen=True)
class _FamilyTokens:
    specials: tuple[str, ...]
    bos: str | None
    eos_token: str  # what ends an assistant turn in the chat template
    eos: tuple[str, ...]  # generation stops on any of these
    pad: str
    prepend_bos: bool
    chat_template: str


# Llama 3: every turn is a header block closed by <|eot_id|>; bos is written by the template.
# With tools (router/tools.py, llama3_json): they are listed in the system turn, a call is
# the assistant turn's JSON ({"name", "parameters"}), a tool's result an ipython turn.
_LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] | trim + '\\n\\n' }}"
    "{%- endif %}"
    "{{- 'You can call these functions. To call one, reply with only a JSON object: '"
    " + '{\"name\": function name, \"parameters\": arguments object}.' }}"
    "{%- for tool in tools %}{{- '\\n\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + fn['name']"
    " + '\", \"parameters\": ' + (fn['arguments'] | tojson) + '}<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# ChatML, as Qwen2/Qwen3 use it (no default system prompt, no bos). With tools (hermes):
# they are listed in a system turn, a call is a <tool_call> block after the assistant's
# text, a tool's result a <tool_response> in a user turn.
_CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n\\nYou can call these functions, listed one JSON object a line within '"
    " + '<tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call one, reply with its name and arguments within '"
    " + '<tool_call></tool_call>:\\n<tool_call>\\n{\"name\": <function name>, '"
    " + '\"arguments\": <arguments object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": '"
    " + (fn['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content']"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Mistral [INST]: no system role, so a system message is folded into the first user turn.
# No `raise_exception` on bad role order: the router renders templates with plain Jinja.
_MISTRAL_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

FAMILIES: dict[str, _FamilyTokens] = {
    "llama3": _FamilyTokens(
        specials=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        eos=("<|end_of_text|>", "<|eot_id|>"),
        pad="<|end_of_text|>",
        prepend_bos=True,
        chat_template=_LLAMA3_TEMPLATE,
    ),
    "qwen": _FamilyTokens(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos_token="<|im_end|>",
        eos=("<|im_end|>", "<|endoftext|>"),
        pad="<|endoftext|>",
        prepend_bos=False,
        chat_template=_CHATML_TEMPLATE,
    ),
    "mistral": _FamilyTokens(
        specials=("<s>", "</s>", "[INST]", "[/INST]"),
        bos="<s>",
        eos_token="</s>",
        eos=("</s>",),
        pad="</s>",
        prepend_bos=True,
        chat_template=_MISTRAL_TEMPLATE,
    ),
}


def _corpus() -> str:
    return resources.files("kernels").joinpath("data/corpus.txt").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=16)
def _build_json(family: str, vocab_size: int) -> str:
    """Train once per (family, vocab_size) per process; callers get fresh copies."""
    spec = FAMILIES[family]
    trained = min(vocab_size, MAX_TRAINED_VOCAB)
    if trained < 256 + len(spec.specials):
        raise ValueError(f"vocab_size {vocab_size} cannot hold 256 byte tokens + specials")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=trained,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in spec.specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = [doc + "\n\n" for doc in _corpus().split("\n\n")]
    tok.train_from_iterator(docs, trainer=trainer)
    if spec.prepend_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A:0",
            pair=f"{spec.bos} $A:0 {spec.bos}:1 $B:1",
            special_tokens=[(spec.bos, bos_id)],
        )
    return _pad_vocab(tok.to_str(), vocab_size)


def _pad_vocab(tokenizer_json: str, vocab_size: int) -> str:
    """Fill ids up to `vocab_size` with `<|reserved_N|>` entries of the BPE vocab itself.

    A random model samples any id < vocab_size, so each one must decode to text. The
    entries are plain vocab (no merge produces them, as with Qwen's unused ids) rather
    than added tokens: 125k added tokens make `AutoTokenizer.from_pretrained` take ~12 s
    (transformers deep-copies each one), plain vocab entries ~0.5 s. Being printable
    ASCII, they pass through the ByteLevel decoder unchanged.
    """
    data = json.loads(tokenizer_json)
    vocab = data["model"]["vocab"]
    start = max(vocab.values()) + 1
    if start >= vocab_size:
        return tokenizer_json
    vocab.update({f"<|reserved_{i}|>": start + i for i in range(vocab_size - start)})
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False)).to_str()


def build_tokenizer(
    family: str, vocab_size: int, model_max_length: int = 4096
) -> tuple[Tokenizer, dict[str, Any]]:
    """Build the family's tokenizer with exactly `vocab_size` ids.

    `model_max_length` goes into `tokenizer_config.json` (the checkpoint writer passes
    the model's `max_position_embeddings`).

    Returns the tokenizer and a dict with `bos_token_id` (None for qwen), `eos_token_ids`
    (generation stops on any), `pad_token_id` and `tokenizer_config` (the content of
    `tokenizer_config.json`, with the chat template).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; choose one of {list(FAMILIES)}")
    spec = FAMILIES[family]
    tok = Tokenizer.from_str(_build_json(family, vocab_size))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"{family} tokenizer has {tok.get_vocab_size()} ids, not {vocab_size}")
    ids = {t: tok.token_to_id(t) for t in spec.specials}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.bos,
        "eos_token": spec.eos_token,
        "pad_token": spec.pad,
        "unk_token": None,
        "add_bos_token": spec.prepend_bos,
        "add_eos_token": False,
        # Byte-level BPE is lossless; "cleaning" spaces before punctuation would break it.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": spec.chat_template,
    }
    info = {
        "bos_token_id": ids[spec.bos] if spec.bos else None,
        "eos_token_ids": [ids[t] for t in spec.eos],
        "pad_token_id": ids[spec.pad],
        "tokenizer_config": tokenizer_config,
    }
    return tok, info
