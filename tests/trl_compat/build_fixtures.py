"""Offline stand-ins for the hub fixtures of TRL's GRPOTrainer test file (``trl-internal-testing/*``).

TRL's tests load tiny random models and the "zen" data set from the Hugging Face Hub. This script builds local
stand-ins so that the test file runs with ``HF_HUB_OFFLINE=1``:

- models: tiny random models of the same architectures, saved in a hub-cache layout under ``<out>/hf_home/hub``
  (so ``from_pretrained("trl-internal-testing/tiny-...")`` finds them with ``HF_HOME=<out>/hf_home``);
- tokenizer: byte-level, with Qwen2.5's ids for the tokens TRL's tests hard-code (``<|endoftext|>`` 151643,
  ``<|im_end|>`` 151645, ``<tool_call>`` 151657, and the pieces of the mocked tool calls), and the chat template
  TRL recognises for each family (so tool calls parse as with the real tokenizer);
- data sets: ``zen`` (prompt-only configs, standard and conversational, train/test) as parquet files under
  ``<out>/datasets``; `plugin.py` points ``datasets.load_dataset`` at them.

The vision-language models and image data sets are not built: those tests fail offline for GRPOTrainer too.

Usage: ``python tests/trl_compat/build_fixtures.py /tmp/trl_fixtures`` (about 20 s, ~60 MB).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

ORG = "trl-internal-testing"
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
LLAMA_PAD = "<|finetune_right_pad_id|>"
VOCAB_SIZE = 151_665

# Qwen2.5 ids of the multi-byte pieces TRL's tests hard-code (tool-call mocks, "I don't know any tool", "Done!"),
# so that decoding those ids gives the same text as the real tokenizer. Single bytes already sit at Qwen's ids.
QWEN_PIECES = {
    4913: '{"',
    606: "name",
    788: '":',
    330: ' "',
    64648: "multiply",
    22785: "_tool",
    7692: "async",
    93054: "_multiply",
    497: '",',
    16370: "arguments",
    5212: ' {"',
    11248: "}}\n",
    1513: " don",
    944: "'t",
    1414: " know",
    894: " any",
    5392: " tool",
    17453: "Done",
}
SPECIAL_IDS = {PAD: 151643, IM_START: 151644, IM_END: 151645, "<tool_call>": 151657, "</tool_call>": 151658}

ZEN = [
    ("Beautiful is better than", " ugly."),
    ("Explicit is", " better than implicit."),
    ("Simple is better", " than complex."),
    ("Complex", " is better than complicated."),
    ("Flat is better than", " nested."),
    ("Sparse is better", " than dense."),
    ("Readability", " counts."),
    ("Special cases aren't special", " enough to break the rules."),
    ("Although practicality beats", " purity."),
    ("Errors should never", " pass silently."),
    ("Unless explicitly", " silenced."),
    ("In the face of ambiguity, refuse", " the temptation to guess."),
    ("There should be one-- and preferably", " only one --obvious way to do it."),
    ("Although that way may not be", " obvious at first unless you're Dutch."),
    ("Now is better", " than never."),
    ("Although never is often better than", " *right* now."),
    ("If the implementation is hard to explain,", " it's a bad idea."),
    ("If the implementation is easy to explain,", " it may be a good idea."),
    ("Namespaces are one honking great idea --", " let's do more of those!"),
]
ZEN_TRAIN = 17  # the rest is the test split


def chat_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def build_tokenizer(template: str | None, extra_special: tuple[str, ...] = ()) -> Qwen2Tokenizer:
    """Byte-level tokenizer with Qwen2.5's ids for the tokens the tests use; every other id decodes to a filler."""
    byte_chars = list(bytes_to_unicode().values())  # GPT-2 / Qwen order: byte piece i has id i
    encode = {b: c for b, c in bytes_to_unicode().items()}
    vocab = {char: i for i, char in enumerate(byte_chars)}
    for token_id, text in QWEN_PIECES.items():
        vocab["".join(encode[b] for b in text.encode())] = token_id
    used = set(vocab.values()) | set(SPECIAL_IDS.values())
    specials = dict(SPECIAL_IDS)
    next_free = 151659
    for token in extra_special:
        specials[token] = next_free
        next_free += 1
    vocab.update(specials)
    used |= set(specials.values())
    for token_id in range(VOCAB_SIZE):
        if token_id not in used:
            vocab[f"<filler_{token_id}>"] = token_id
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[t for t in specials if t not in (PAD, IM_END)],
        padding_side="left",
    )
    if template is not None:
        tokenizer.chat_template = template
    for token, token_id in specials.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, (token, tokenizer.convert_tokens_to_ids(token))
    return tokenizer


def small(config_class, **overrides):
    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=8,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=SPECIAL_IDS[PAD],
        eos_token_id=SPECIAL_IDS[IM_END],
        bos_token_id=None,
    )
    settings.update(overrides)
    return config_class(**settings)


def models() -> dict[str, tuple]:
    """``name -> (model class, config, chat template, extra special tokens)``."""
    qwen25, qwen3 = chat_template("qwen2_5"), chat_template("qwen3")
    return {
        "tiny-Qwen2ForCausalLM-2.5": (Qwen2ForCausalLM, small(Qwen2Config, tie_word_embeddings=True), qwen25, ()),
        "tiny-Qwen2ForSequenceClassification-2.5": (
            Qwen2ForSequenceClassification,
            small(Qwen2Config, num_labels=1, tie_word_embeddings=True),
            qwen25,
            (),
        ),
        "tiny-Qwen3ForCausalLM": (Qwen3ForCausalLM, small(Qwen3Config, head_dim=4), qwen3, ()),
        "tiny-Qwen3ForSequenceClassification": (
            Qwen3ForSequenceClassification,
            small(Qwen3Config, head_dim=4, num_labels=1),
            qwen3,
            (),
        ),
        "tiny-Qwen3MoeForCausalLM": (
            Qwen3MoeForCausalLM,
            small(Qwen3MoeConfig, head_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
            qwen3,
            (),
        ),
        "tiny-Gemma2ForCausalLM": (Gemma2ForCausalLM, small(Gemma2Config, head_dim=4), chat_template("gemma"), ()),
        "tiny-LlamaForSequenceClassification-3.2": (
            LlamaForSequenceClassification,
            small(LlamaConfig, num_labels=1),
            chat_template("llama3_2"),
            (LLAMA_PAD,),
        ),
    }


def save_to_hub_cache(hf_home: Path, repo_id: str, save) -> Path:
    """Save files with ``save(directory)`` where `huggingface_hub` looks for ``repo_id`` offline."""
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    save(snapshot)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def build_models(hf_home: Path) -> None:
    for index, (name, (model_class, config, template, extra)) in enumerate(models().items()):
        tokenizer = build_tokenizer(template, extra)
        torch.manual_seed(index)
        model = model_class(config)
        if hasattr(model, "generation_config") and model.can_generate():
            model.generation_config = GenerationConfig(
                eos_token_id=SPECIAL_IDS[IM_END], pad_token_id=SPECIAL_IDS[PAD], do_sample=True
            )

        def save(directory, model=model, tokenizer=tokenizer):
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)

        print("model", save_to_hub_cache(hf_home, f"{ORG}/{name}", save))


def build_datasets(out: Path) -> None:
    from datasets import Dataset

    def conversational(prompt: str) -> list[dict]:
        return [{"role": "user", "content": f"What comes after '{prompt}'?"}]

    for split, rows in (("train", ZEN[:ZEN_TRAIN]), ("test", ZEN[ZEN_TRAIN:])):
        for config, make in (
            ("standard_prompt_only", lambda p: {"prompt": p}),
            ("conversational_prompt_only", lambda p: {"prompt": conversational(p)}),
        ):
            path = out / "datasets" / "zen" / config / f"{split}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            Dataset.from_list([make(prompt) for prompt, _ in rows]).to_parquet(str(path))
            print("dataset", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for hf_home/ (models) and datasets/")
    out = parser.parse_args().out
    build_models(out / "hf_home")
    build_datasets(out)


if __name__ == "__main__":
    main()
