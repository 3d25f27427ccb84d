"""Tiny, randomly initialised causal LMs with a real byte-level BPE tokenizer, built in-process.

Used by the tests and by ``make demo-quick``: no downloads, seconds to build. The tokenizer is
trained on a small built-in corpus, has a ChatML chat template (like SmolLM2's), and can encode
any text (byte-level alphabet).
"""

from __future__ import annotations

import os
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The patient presents with fever, cough and shortness of breath.",
    "Diagnosis: pneumonia. Impression: no acute cardiopulmonary abnormality.",
    "Warfarin and aspirin: major interaction, increased bleeding risk.",
    "Summarize the report. Findings: mild cardiomegaly. Impression: stable.",
    "What is the capital of France? Paris. Water boils at 100 degrees Celsius.",
    "Drug pair: simvastatin + clarithromycin. Interaction: major (CYP3A4 inhibition).",
    "Symptoms: headache, stiff neck, photophobia. Condition: meningitis.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?()-+/",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer wrapped for transformers, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(arch: str, tokenizer, *, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2):
    """A tiny config of the given family (llama, mistral, qwen2, phi3, gpt2)."""
    import transformers as tf

    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **common)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "phi3": tf.Phi3Config}[arch]
    kw = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
              tie_word_embeddings=False, **common)
    if arch == "phi3":
        kw.pop("bos_token_id")
    return cls(**kw)


def build_tiny_model(out_dir: str | os.PathLike, *, arch: str = "llama", seed: int = 0, **size) -> Path:
    """Save a tiny random model + tokenizer to ``out_dir`` (a normal transformers directory)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    cfg = build_config(arch, tok, **size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
