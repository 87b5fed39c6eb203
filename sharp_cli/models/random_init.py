"""Models with random weights: the real architecture from a config, no download.

Speed does not depend on the weights, so `--random-weights` measures real-size prefill on any
machine; tests build tiny versions of the same classes. The tokenizer is a word-level one made
with `tokenizers`, with the family's special tokens at the ids the config expects.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_WORDS = (
    "the a an of in on at to and or is are was were be it this that what which who where when how why "
    "video clip frame frames scene happens happen does do did color colour shape ball box object objects "
    "red green blue yellow white black orange purple grey gray circle square triangle moves move moving "
    "left right up down first second last before after appears appear count many one two three four five "
    "six seven eight nine ten zero yes no answer option options letter with only describe person man woman "
    "car dog cat small large big top bottom middle direction event events please question the choose"
).split()
_PUNCT = list(".,?!:;()'\"-") + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(10)]
_EXTRA = ["seconds", "<", ">", "user", "assistant", "system"]  # timestamps, roles (appended: earlier ids kept)

# Hub ids whose checkpoints share a shipped config's architecture (SOURCES.md, docs/model-configs.md).
ALIASES = {"llava-hf/LLaVA-Video-7B-Qwen2-hf": "llava-hf/llava-onevision-qwen2-7b-ov-hf"}


def packaged_configs() -> dict[str, Path]:
    """Hub id -> folder of the config files shipped with sharp (aliases included)."""
    shipped = {p.name.replace("--", "/"): p for p in sorted(CONFIG_DIR.iterdir()) if (p / "config.json").exists()}
    return shipped | {alias: shipped[target] for alias, target in ALIASES.items() if target in shipped}


def _config_folder(name_or_path: str) -> Path:
    from sharp_cli.errors import ModelError

    shipped = packaged_configs()
    path = Path(name_or_path)
    if name_or_path in shipped:
        path = shipped[name_or_path]
    if path.is_file():
        path = path.parent
    if not (path / "config.json").exists():
        raise ModelError(
            f"no config for '{name_or_path}' to build random weights from; shipped: {', '.join(shipped)}"
        )
    return path


def load_config(name_or_path: str):
    """A shipped config by hub id (or a folder/config.json path)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(_config_folder(name_or_path)))


def load_generation_config(name_or_path: str):
    """The checkpoint's generation_config.json shipped beside its config, or None: decoding follows
    it (repetition penalty, EOS ids) as generate() does, random weights or not."""
    from transformers import GenerationConfig

    folder = _config_folder(name_or_path)
    return GenerationConfig.from_pretrained(str(folder)) if (folder / "generation_config.json").exists() else None


def synthetic_tokenizer(special: dict[str, int], vocab_size: int, words: list[str] | None = None):
    """Word-level tokenizer whose special tokens sit at the ids the model config expects; `words`
    replaces the built-in vocabulary (letters, digits and punctuation are always in)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    taken = set(special.values())
    if 0 in taken:
        raise ValueError("special tokens must not take id 0 (the unknown token's)")
    vocab = {"[UNK]": 0}
    free = (i for i in range(1, vocab_size) if i not in taken)
    for word, token_id in zip(dict.fromkeys((words or _WORDS) + _PUNCT + _EXTRA), free):
        vocab[word] = token_id
    # Every other id gets a filler word, so what a random model says is visible, not blank.
    vocab.update({f"w{token_id}": token_id for token_id in free})
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.add_special_tokens({"additional_special_tokens": list(special)})
    eos = [t for t in special if t in ("<|im_end|>", "<|eot_id|>")] or list(special)[:1]
    fast.eos_token = eos[0]
    fast.pad_token = list(special)[0]
    return fast


def tiny_config(family: str = "qwen2.5-vl", *, layers: int = 4, vocab: int = 512):
    """A few-MB config of the family's real classes, for tests. Special ids sit near the top of the
    vocabulary (never 0, the unknown token's), where the real checkpoints put theirs."""
    from transformers import LlavaOnevisionConfig, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    special = {"bos": vocab - 12, "im_start": vocab - 11, "eos": vocab - 10, "vstart": vocab - 9,
               "vend": vocab - 8, "vpad": vocab - 7, "image": vocab - 6, "video": vocab - 5}
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_parameters=dict(rope, mrope_section=[2, 3, 3]),
        bos_token_id=special["bos"], eos_token_id=special["eos"], tie_word_embeddings=False,
    )
    ids = dict(
        image_token_id=special["image"], video_token_id=special["video"],
        vision_start_token_id=special["vstart"], vision_end_token_id=special["vend"],
        vision_token_id=special["vpad"], bos_token_id=special["bos"], eos_token_id=special["eos"],
    )
    if family == "qwen2.5-vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    if family == "qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
    if family == "qwen3-vl":  # q/k norms, interleaved M-RoPE, DeepStack from 3 vision layers
        text.update(head_dim=16, rope_parameters=dict(rope, mrope_section=[2, 3, 3], mrope_interleaved=True))
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=8, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1, 2])
        ids = {k: v for k, v in ids.items() if k not in ("vision_token_id", "bos_token_id", "eos_token_id")}
        return Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
    if family == "llava-onevision":  # SigLIP 98 px / 14 -> 7x7 patches, pooled to 4x4 per frame
        text.update(model_type="qwen2", rope_parameters=rope)
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=98, patch_size=14, vision_use_head=False)
        return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=special["image"],
                                    video_token_index=special["video"], vision_feature_layer=-1,
                                    vision_feature_select_strategy="full",
                                    image_grid_pinpoints=[[98, 98], [98, 196], [196, 98], [196, 196]])
    raise ValueError(f"no tiny config for family {family!r}")


def build_random(config, *, dtype="bfloat16", device="cpu", seed: int = 0, generation_config=None):
    """(model, processor) with random weights, built in place on `device`."""
    import torch
    from transformers import AutoModelForImageTextToText

    from sharp_cli.models import adapter_for

    adapter = adapter_for(config)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
    model.eval()
    if generation_config is not None:
        model.generation_config = generation_config
    vocab = config.text_config.vocab_size if hasattr(config, "text_config") else config.vocab_size
    tokenizer = synthetic_tokenizer(adapter.special_tokens(config), vocab)
    return model, adapter.build_processor(tokenizer, config)


def write_random_model(config, out_dir: str | Path, *, dtype="bfloat16", device="cpu", seed: int = 0,
                       generation_config=None) -> Path:
    """A loadable model folder (safetensors + tokenizer + processor) with random weights, so the real
    `from_pretrained` path can be exercised offline."""
    out = Path(out_dir)
    model, processor = build_random(config, dtype=dtype, device=device, seed=seed, generation_config=generation_config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "sharp_random_weights.json").write_text(json.dumps({"random_weights": True, "seed": seed}) + "\n")
    return out
