"""Tiny real checkpoints of each causal-LM architecture, and in-memory transformers references.

``build_model`` writes what ``save_pretrained`` writes (the Hub layout: Mixtral's experts one
tensor per expert, tied heads left out) with a word-level tokenizer whose vocabulary is exactly
the config's ``vocab_size``. The references load the whole model the usual way, independently of
streammerge, so the layer stream can be checked against them.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2",
                             "gpt_neox", "falcon", "mixtral", "falcon_alibi")

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos, eos, unk
PAD, BOS, EOS = 0, 1, 2
PUNCT = (".", ",")
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their been has when who will more no if out so "
    "what up said about than its into them only time some could new these two may first then do any "
    "like my now over such our man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right used "
    "take three place small found house water light river stone"
).split()
# Families whose published tokenizers prepend a BOS (Llama/Mistral/Gemma SentencePiece); GPT-2,
# GPT-NeoX, Falcon, Qwen and Phi-3-mini's tokenizer configs add none.
ADDS_BOS = frozenset({"llama", "mistral", "gemma", "gemma2", "mixtral"})
# Gemma 2 has no sdpa kernel in transformers (softcapping); it runs eager with explicit masks.
EAGER_ONLY = frozenset({"gemma2"})


def _vocab_words(vocab: int) -> list[str]:
    n = vocab - len(SPECIALS) - len(PUNCT)
    if n < 16:
        raise ValueError(f"vocab {vocab} is too small: need at least {16 + len(SPECIALS) + len(PUNCT)}")
    return (list(WORDS) + [f"x{i}" for i in range(max(0, n - len(WORDS)))])[:n]


def tiny_config(family: str, vocab: int = 128):
    """A transformers config for ``family`` at tiny size that exercises what makes it special."""
    from transformers import AutoConfig

    # Weights of std 1 give logits of std ~8, so the top-2 gap of a greedy step is rarely under
    # 1e-3 and a correct layer stream cannot flip a token; Gemma 2's softcap of 4 would saturate
    # there (every logit near 4), so it keeps 0.3.
    init = 0.3 if family == "gemma2" else 1.0
    common = dict(vocab_size=vocab, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                  initializer_range=init)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    match family:
        case "llama" | "phi3":  # phi3: fused qkv_proj and gate_up_proj
            return AutoConfig.for_model(family, **common, **llama_like)
        case "mistral":  # a window of 8 so that 16-32-token windows hit the sliding mask
            return AutoConfig.for_model(family, **common, **llama_like, sliding_window=8)
        case "qwen2":  # q/k/v biases; layers >= max_window_layers slide (sdpa honours it)
            return AutoConfig.for_model(family, **common, **llama_like, use_sliding_window=True,
                                        sliding_window=8, max_window_layers=1)
        case "qwen3":  # q_norm/k_norm; head_dim given explicitly as on the Hub
            return AutoConfig.for_model(family, **common, **llama_like, head_dim=16)
        case "gemma":  # tied head, (1 + w) norms, embeddings scaled by sqrt(hidden)
            return AutoConfig.for_model(family, **common, **llama_like, head_dim=16)
        case "gemma2":  # alternating sliding/full layers; softcaps small enough to bite
            return AutoConfig.for_model(family, **common, **llama_like, head_dim=16, sliding_window=8,
                                        query_pre_attn_scalar=16, attn_logit_softcapping=4.0,
                                        final_logit_softcapping=4.0)
        case "mixtral":  # 4 experts, top-2 routing
            return AutoConfig.for_model(family, **common, **llama_like, num_local_experts=4,
                                        num_experts_per_tok=2)
        case "gpt2":  # Conv1D weights, learned positions, tied head
            return AutoConfig.for_model(family, **common, n_embd=64, n_inner=96, n_layer=3, n_head=4,
                                        n_positions=256)
        case "gpt_neox":  # partial rotary, parallel residual, fused query_key_value
            return AutoConfig.for_model(family, **common, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.25,
                                        use_parallel_residual=True, max_position_embeddings=256)
        case "falcon" | "falcon_alibi":  # Falcon-7B's layout: multi-query, parallel attention
            return AutoConfig.for_model("falcon", **common, hidden_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, new_decoder_architecture=False,
                                        multi_query=True, parallel_attn=True,
                                        alibi=family == "falcon_alibi", max_position_embeddings=256)
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def write_word_tokenizer(path: Path, vocab: int, add_bos: bool) -> None:
    """A word-level ``tokenizer.json`` of exactly ``vocab`` entries (specials, words, punctuation)
    that ``AutoTokenizer`` loads, prepending ``<s>`` when ``add_bos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    entries = [*SPECIALS, *_vocab_words(vocab), *PUNCT]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(entries)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces, punctuation attached
    tok.add_special_tokens(list(SPECIALS))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    tok.save(str(path / "tokenizer.json"))
    _write_tokenizer_config(path, "PreTrainedTokenizerFast", add_bos)


def byte_bpe_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Specials, then a byte-level BPE (GPT-2/Qwen symbols: "Ġ" a space, "Ċ" a newline) whose
    merges build every word, with and without a leading space, one character at a time."""
    pieces = sorted(set("".join(words)))
    merges: list[tuple[str, str]] = []
    for form in [*PUNCT, "Ċ", "ĊĊ", *words, *("Ġ" + w for w in words)]:
        for i in range(1, len(form) + 1):
            if form[:i] not in pieces:
                pieces.append(form[:i])
                if i > 1:
                    merges.append((form[: i - 1], form[i - 1]))
    # Space-led chains first: within a word only its own chain then applies, so " word" is one
    # token; a paragraph's first word may split (still into known pieces).
    merges.sort(key=lambda m: (not m[0].startswith("Ġ"), len(m[0]) + len(m[1])))
    return {t: i for i, t in enumerate([*SPECIALS, *pieces])}, merges


def write_byte_bpe_tokenizer(path: Path) -> int:
    """Qwen2's tokenizer: transformers rebuilds ``Qwen2Tokenizer`` (byte-level BPE, its own
    pre-tokenizer) from ``tokenizer.json``'s vocab and merges whatever the config says, so the
    vocabulary must be byte-level; it is larger than 128. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = byte_bpe_vocab(_vocab_words(128))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(path / "tokenizer.json"))
    _write_tokenizer_config(path, "Qwen2Tokenizer", False)
    return len(vocab)


def _write_tokenizer_config(path: Path, tokenizer_class: str, add_bos: bool) -> None:
    config = {"tokenizer_class": tokenizer_class, "pad_token": "<pad>", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": add_bos}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def family_vocab(family: str, vocab: int = 128) -> int:
    """The vocabulary size ``build_model`` gives ``family``: ``vocab``, except Qwen2's byte-level
    BPE, whose size its words fix."""
    return len(byte_bpe_vocab(_vocab_words(128))[0]) if family == "qwen2" else vocab


def build_model(root: Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                vocab: int = 128) -> Path:
    """Write a seeded random ``family`` model with ``save_pretrained`` and its tokenizer to
    ``root / family``; the same arguments give the same weights."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, family_vocab(family, vocab))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    path = root / family
    model.save_pretrained(path, safe_serialization=True)
    if family == "qwen2":
        write_byte_bpe_tokenizer(path)
    else:
        write_word_tokenizer(path, vocab, family in ADDS_BOS)
    return path


def sample_text(n_words: int, seed: int = 0) -> str:
    """Deterministic English-like text of ``n_words`` words (plus punctuation), all in the
    default 128-entry vocabulary, as paragraphs separated by blank lines."""
    rng = random.Random(seed)
    words = _vocab_words(128)
    paragraphs, sentences, sentence = [], [], []
    for i in range(n_words):
        sentence.append(rng.choice(words))
        if len(sentence) >= 4 and rng.random() < 0.12:
            sentence[-1] += ","
        if len(sentence) >= 6 and rng.random() < 0.2 or i == n_words - 1:
            sentence[-1] = sentence[-1].rstrip(",") + "."
            sentences.append(" ".join(sentence))
            sentence = []
            if len(sentences) >= 3 and rng.random() < 0.4 or i == n_words - 1:
                paragraphs.append(" ".join(sentences))
                sentences = []
    return "\n\n".join(paragraphs)


def _family_of(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return "falcon_alibi" if config.get("alibi") else config["model_type"]


def load_reference(model_dir: Path, dtype: torch.dtype = torch.float32):
    """The whole model, loaded the usual way, in eval mode (sdpa unless the family has none)."""
    from transformers import AutoModelForCausalLM

    attn = "eager" if _family_of(model_dir) in EAGER_ONLY else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return model.eval()


@torch.no_grad()
def reference_nll(model_dir: Path, windows: list[tuple[torch.Tensor, int]],
                  dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """Sum of the NLL (float64) of ``ids[p]`` given ``ids[:p]`` for ``p`` in ``score_from..L-1``
    over ``windows`` of ``(ids [L] int64, score_from)``, and the number of tokens scored."""
    model = load_reference(model_dir, dtype)
    total, count = 0.0, 0
    for ids, score_from in windows:
        logits = model(ids[None]).logits[0].double()
        logp = torch.log_softmax(logits[score_from - 1 : -1], dim=-1)
        target = ids[score_from:]
        total += -logp.gather(1, target[:, None]).sum().item()
        count += target.numel()
    return total, count


@torch.no_grad()
def reference_generate(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding): the new token ids of each, ending
    with EOS (included) when generation stopped early."""
    from transformers import AutoTokenizer

    model = load_reference(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
        new = gen[0, enc["input_ids"].shape[1] :].tolist()
        eos = model.generation_config.eos_token_id
        stop = next((i for i, t in enumerate(new) if t == eos), None)
        out.append(new if stop is None else new[: stop + 1])
    return out


LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(root: Path, model_dir: Path, seed: int) -> Path:
    """A PEFT LoRA adapter (r=4, every attention and MLP linear of a Llama) for ``model_dir`` with
    random non-zero ``lora_B`` (PEFT starts it at zero), saved with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    model = load_reference(model_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LORA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    path = root / f"{model_dir.name}-lora{seed}"
    peft_model.save_pretrained(path)
    return path


def folded_model(root: Path, model_dir: Path, adapter_dir: Path) -> Path:
    """``model_dir`` with ``adapter_dir`` folded in by PEFT's ``merge_and_unload``, saved as a full
    checkpoint with the base's tokenizer: the reference for ``model_dir+adapter_dir``."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_reference(model_dir), adapter_dir).merge_and_unload()
    path = root / f"{model_dir.name}+{adapter_dir.name}"
    merged.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, path / name)
    return path
