"""Load a video LLM, then answer in explicit phases: encode -> prefill (with pruning) -> decode.

Each phase is a small function that can be timed alone (gpt-fast style). Pruning happens inside
prefill through forward pre-hooks (prune/session.py); the model code is transformers' own.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sharp_cli import measure
from sharp_cli.compat import cache_kwargs
from sharp_cli.errors import DeviceError, ModelError, UsageError
from sharp_cli.models import adapter_for
from sharp_cli.prune import attention
from sharp_cli.prune.config import PruneConfig
from sharp_cli.prune.prior import PriorStore
from sharp_cli.prune.session import PruneSession, StopPrefill

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
SHARP_TINY = Path(__file__).resolve().parent / "models" / "sharp_tiny"  # scripts/train_sharp_tiny.py

PRIOR_QUESTION = "What happens in this video?"  # fixed prompt of the positional-prior pass


@dataclass
class Loaded:
    model: object
    processor: object
    adapter: object
    name: str
    device: torch.device
    dtype: torch.dtype
    quant: str
    random_weights: bool = False
    graphs: object = None  # prune.graphs.TailGraphs on CUDA unless turned off

    def use_cuda_graphs(self, enabled: bool = True) -> "Loaded":
        from sharp_cli.prune.graphs import TailGraphs

        self.graphs = TailGraphs() if enabled and self.device.type == "cuda" else None
        return self

    @property
    def num_layers(self) -> int:
        return len(self.adapter.decoder_layers(self.model))

    @property
    def dims(self) -> dict:
        return measure.text_dims(self.model.config)


# -- loading ---------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch")
    if device not in ("cuda", "cpu"):
        raise UsageError(f"--device must be auto, cuda or cpu, got '{device}'")
    return torch.device(device)


def resolve_quant(quant: str, device: torch.device) -> str:
    if quant == "auto":
        return "nf4" if device.type == "cuda" else "none"
    if quant not in ("nf4", "int8", "none"):
        raise UsageError(f"--quant must be auto, nf4, int8 or none, got '{quant}'")
    if quant != "none" and device.type != "cuda":
        raise UsageError(f"--quant {quant} needs a CUDA GPU (bitsandbytes); use --quant none on CPU")
    return quant


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype must be auto, bfloat16, float16 or float32, got '{dtype}'")
    return getattr(torch, dtype)


def quantization_config(quant: str, adapter):
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise DeviceError(f"--quant {quant} needs bitsandbytes ({exc}); install it or use --quant none") from None
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=adapter.skip_modules())
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=adapter.skip_modules())


def model_path(name: str) -> str:
    """`sharp-tiny` -> the folder shipped in the package; any other name as given."""
    if name != "sharp-tiny":
        return name
    if not (SHARP_TINY / "model.safetensors").exists():
        raise ModelError(f"sharp-tiny is not in this install ({SHARP_TINY}); scripts/train_sharp_tiny.py makes it")
    return str(SHARP_TINY)


def _read_config(name: str, trust_remote_code: bool):
    from transformers import AutoConfig

    name = model_path(name)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "local folder" if Path(name).exists() else "model id"
        raise ModelError(f"cannot load {where} '{name}': {exc}") from None


def load(name: str = DEFAULT_MODEL, *, device: str = "auto", quant: str = "auto", dtype: str = "auto",
         random_weights: bool = False, trust_remote_code: bool = False) -> Loaded:
    """from_pretrained on a hub id or local folder; or, with random_weights, the same architecture
    built from a shipped config (quantized runs go through a saved folder and from_pretrained)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    requested, name = name, model_path(name)  # reported as given, not as the folder it resolves to
    dev = resolve_device(device)
    qmode = resolve_quant(quant, dev)
    tdtype = resolve_dtype(dtype, dev)
    if random_weights:
        from sharp_cli.models import random_init

        config = random_init.load_config(name)
        if qmode == "none":
            model, processor = random_init.build_random(config, dtype=tdtype, device=dev)
            return _ready(Loaded(model, processor, adapter_for(config), name, dev, tdtype, qmode, True))
        name = str(_random_folder(name, config, dev))
    config = _read_config(name, trust_remote_code)
    adapter = adapter_for(config)
    kwargs = dict(dtype=tdtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code,
                  use_safetensors=True)
    qconfig = quantization_config(qmode, adapter)
    if qconfig is not None:
        # The current device, not GPU 0: sharded evals set it per rank (torch.cuda.set_device).
        kwargs.update(quantization_config=qconfig,
                      device_map={"": dev.index if dev.index is not None else torch.cuda.current_device()})
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model '{name}': {exc}") from None
    if qconfig is None:
        model.to(dev)
    model.eval()
    return _ready(Loaded(model, processor, adapter, requested, dev, tdtype, qmode, random_weights))


def check_prune_config(name: str, cfg: PruneConfig, *, random_weights: bool = False,
                       trust_remote_code: bool = False) -> PruneConfig:
    """cfg with K resolved for the model and validated against its depth, from its config alone,
    before any heavy work."""
    if random_weights:
        from sharp_cli.models import random_init

        config = random_init.load_config(name)
    else:
        config = _read_config(name, trust_remote_code)
    return adapter_for(config).validate_prune(cfg, measure.text_dims(config)["layers"])


def _random_folder(name: str, config, device) -> Path:
    from sharp_cli.models import random_init
    from sharp_cli.prune.prior import cache_dir

    shipped = random_init.packaged_configs().get(name)  # aliases share their architecture's folder
    folder = cache_dir() / "random-models" / (shipped.name if shipped else name.replace("/", "--"))
    if not (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists():
        random_init.write_random_model(config, folder, dtype="bfloat16", device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return folder


def _freeze_gc() -> None:
    """A loaded model is ~10^5 long-lived Python objects; moving them out of the collector's view
    keeps full collections from stalling decode steps (CPU-bound in eager transformers)."""
    import gc

    gc.collect()
    gc.freeze()


def _ready(loaded: Loaded) -> Loaded:
    """Route the text model's attention through sharp_sdpa (stock SDPA unless a segment plan is on),
    and a packed vision tower's through one SDPA call per window length instead of one per window."""
    from sharp_cli.models import vision_attention

    name = attention.register()
    text_config = loaded.adapter.text_model(loaded.model).config
    text_config._attn_implementation = name
    visual = getattr(getattr(loaded.model, "model", None), "visual", None)
    if visual is not None and getattr(visual.config, "_attn_implementation", None) == "sdpa":
        visual.config._attn_implementation = vision_attention.register()
    _freeze_gc()
    return loaded.use_cuda_graphs(True)


# -- phases ----------------------------------------------------------------------------------
def prepare(loaded: Loaded, clip, question: str, max_pixels: int | None = None):
    """Prompt + frames -> processor tensors on the device (whole: mm_token_type_ids included)."""
    if not question or not question.strip():
        raise UsageError("the question is empty")
    prompt = loaded.adapter.prompt(loaded.processor, question)
    inputs = loaded.adapter.processor_inputs(loaded.processor, prompt, clip, max_pixels)
    return inputs.to(loaded.device)


@torch.inference_mode()
def encode(loaded: Loaded, inputs):
    """Vision encoder + embeddings + positions; returns (Encoded, vision seconds)."""
    watch = measure.Stopwatch(loaded.device)
    with watch:
        encoded = loaded.adapter.encode(loaded.model, inputs)
    return encoded, watch.seconds


@dataclass
class Prefill:
    cache: object
    next_token: torch.Tensor  # (1, 1)
    logits: torch.Tensor  # (1, 1, vocab) at the last position
    seconds: float
    selection_seconds: float
    kept: torch.Tensor | None  # kept visual token numbers
    kept_len: int  # sequence length seen by layers K..L-1
    kv_cache_bytes: int
    kv_cache_bytes_unpruned: int
    session: PruneSession | None = None


@torch.inference_mode()
def prefill(loaded: Loaded, encoded, cfg: PruneConfig, prior=None, forced_keep=None) -> Prefill:
    from transformers import DynamicCache

    cfg = loaded.adapter.validate_prune(cfg, loaded.num_layers)  # K resolved when not given
    text = loaded.adapter.text_model(loaded.model)
    cache = DynamicCache(config=text.config)
    select_watch = measure.Stopwatch(loaded.device)
    session = None
    if cfg.prunes:
        session = PruneSession(loaded.adapter, loaded.model, encoded, cfg, prior=prior,
                               forced_keep=forced_keep, timer=select_watch, graphs=loaded.graphs)
    watch = measure.Stopwatch(loaded.device)
    with watch, (session or nullcontext()):
        out = text(inputs_embeds=encoded.inputs_embeds, position_ids=encoded.position_ids,
                   use_cache=True, **cache_kwargs(text, cache), **encoded.extra)
        logits = loaded.adapter.lm_head(loaded.model)(out.last_hidden_state[:, -1:])
        token = logits.argmax(-1)
    kept = session.kept if session else None
    kept_len = session.keep_positions.numel() if session else encoded.layout.seq_len
    kv = measure.kv_cache_bytes(cache)
    kv_full = measure.kv_cache_bytes_unpruned(cache, len(loaded.adapter.decoder_layers(loaded.model)))
    return Prefill(cache, token, logits, watch.seconds, select_watch.seconds, kept, kept_len, kv, kv_full, session)


@torch.inference_mode()
def decode(loaded: Loaded, encoded, state: Prefill, max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding from the prefill cache; stops at EOS. Returns (token ids, seconds)."""
    text = loaded.adapter.text_model(loaded.model)
    head = loaded.adapter.lm_head(loaded.model)
    eos = eos_ids(loaded)
    token = state.next_token
    tokens = [int(token)]
    watch = measure.Stopwatch(loaded.device)
    with watch:
        for step in range(max_new_tokens - 1):
            if tokens[-1] in eos:
                break
            embeds = loaded.adapter.embed(loaded.model, token)
            out = text(inputs_embeds=embeds, position_ids=loaded.adapter.decode_position(encoded, step),
                       use_cache=True, **cache_kwargs(text, state.cache))
            token = head(out.last_hidden_state[:, -1:]).argmax(-1)
            tokens.append(int(token))
    return tokens, watch.seconds


def eos_ids(loaded: Loaded) -> set[int]:
    ids = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.model.config,
                   getattr(loaded.model.config, "text_config", None), loaded.processor.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


# -- the positional prior -----------------------------------------------------------------------
@dataclass
class PriorInfo:
    prior: torch.Tensor | None = None
    cached: bool = False
    seconds: float = 0.0


def positional_prior(loaded: Loaded, clip, encoded, cfg: PruneConfig, store: PriorStore,
                     max_pixels: int | None = None) -> PriorInfo:
    """Layer-K scores of an all-black clip with the same frames and size, cached per layout."""
    if not cfg.uses_prior:
        return PriorInfo()
    cfg = loaded.adapter.validate_prune(cfg, loaded.num_layers)
    layout = encoded.layout
    key = store.key({
        "model": loaded.name, "class": type(loaded.model).__name__, "dtype": str(loaded.dtype),
        "quant": loaded.quant, "grid": layout.grid, "frames_per_step": layout.frames_per_step,
        "layer": cfg.layer, "query": cfg.query, "segment_mask": cfg.segment_mask,
        "segment_frames": cfg.segment_frames, "random_weights": loaded.random_weights,
    })
    prior = store.get(key)
    if prior is not None:
        return PriorInfo(prior.to(loaded.device), True, 0.0)
    black = _black_clip(clip)
    watch = measure.Stopwatch(loaded.device)
    with watch:
        inputs = prepare(loaded, black, PRIOR_QUESTION, max_pixels)
        black_encoded, _ = encode(loaded, inputs)
        if black_encoded.layout.grid != layout.grid:
            raise ModelError("the black-video prior pass produced a different token layout")
        scores = _scores_only(loaded, black_encoded, cfg)
    store.put(key, scores, {"model": loaded.name, "grid": layout.describe(), "layer": cfg.layer})
    return PriorInfo(scores, False, watch.seconds)


@torch.inference_mode()
def _scores_only(loaded: Loaded, encoded, cfg: PruneConfig) -> torch.Tensor:
    text = loaded.adapter.text_model(loaded.model)
    session = PruneSession(loaded.adapter, loaded.model, encoded, cfg, score_only=True)
    try:
        with session:
            text(inputs_embeds=encoded.inputs_embeds, position_ids=encoded.position_ids, use_cache=False,
                 **encoded.extra)
    except StopPrefill:
        pass
    return session.scores


def _black_clip(clip):
    black = copy.copy(clip)
    black.frames = np.zeros_like(clip.frames)
    return black


# -- one question, end to end -------------------------------------------------------------------
@dataclass
class Answer:
    text: str
    tokens: list[int]
    encoded: object
    prefill: Prefill
    vision_seconds: float
    decode_seconds: float
    prior: PriorInfo
    peak_memory_bytes: int | None
    extra: dict = field(default_factory=dict)


def ask(loaded: Loaded, clip, question: str, cfg: PruneConfig, *, max_new_tokens: int = 128,
        max_pixels: int | None = None, store: PriorStore | None = None, warmup: int = 0) -> Answer:
    """One question end to end. `warmup` untimed passes first: a fresh CUDA process spends most of
    its first prefill loading kernels, which says nothing about the method."""
    cfg = loaded.adapter.validate_prune(cfg, loaded.num_layers)
    store = store or PriorStore()
    inputs = prepare(loaded, clip, question, max_pixels)
    if warmup and loaded.graphs is not None:
        loaded.graphs.capture_after = 0  # warming up says the length will be reused: capture now
    for _ in range(warmup):
        encoded, _ = encode(loaded, inputs)
        prior = positional_prior(loaded, clip, encoded, cfg, store, max_pixels)
        decode(loaded, encoded, prefill(loaded, encoded, cfg, prior=prior.prior), 2)
    measure.reset_peak_memory(loaded.device)
    encoded, vision_s = encode(loaded, inputs)
    prior = positional_prior(loaded, clip, encoded, cfg, store, max_pixels)
    state = prefill(loaded, encoded, cfg, prior=prior.prior)
    tokens, decode_s = decode(loaded, encoded, state, max_new_tokens)
    text = loaded.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return Answer(
        text=text, tokens=tokens, encoded=encoded, prefill=state, vision_seconds=vision_s,
        decode_seconds=decode_s, prior=prior, peak_memory_bytes=measure.peak_memory_bytes(loaded.device),
    )
