"""Load a video LLM for sharp: resolve device, dtype and quantization, then `from_pretrained` on a hub
id or a local folder (or the same architecture with random weights), and route its attention
through sharp's functions. Everything the phases need travels in one `Loaded`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sharp_cli import DEFAULT_MODEL, hub, measure  # DEFAULT_MODEL lives in the package root: --help needs it
from sharp_cli.errors import DeviceError, ModelError, UsageError
from sharp_cli.model_files import SHARP_SMALL, SHARP_TINY, SHIPPED  # noqa: F401  (the test models in the package)
from sharp_cli.models import adapter_for
from sharp_cli.prune import attention
from sharp_cli.prune.config import PruneConfig


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
    graphs: object = None  # prune.graphs.TailGraphs on CUDA unless turned off (also gates decode graphs)
    kv_pool: object = None  # kv.KVPool: the preallocated KV caches (and the decode graphs on them)
    compiled: bool = False  # --compile: decode steps through torch.compile (decode.compiled) ...
    compiled_vision: object = None  # ... and the vision blocks (compiled.CompiledStack, used by engine.encode)
    vision_graphs: object = None  # models.vision_graphs.VisionGraphs: SHARP_VISION_GRAPHS=1 on CUDA (engine.encode)
    folder: str | None = None  # where the model's files are (a local folder or the hub cache's snapshot)
    prior_identity: dict | None = None  # hashes naming the model in prior cache keys (prior_pass.py)

    def use_cuda_graphs(self, enabled: bool = True) -> "Loaded":
        from sharp_cli.prune.graphs import TailGraphs

        self.graphs = TailGraphs() if enabled and self.device.type == "cuda" else None
        return self

    def use_compile(self, enabled: bool = True) -> "Loaded":
        """torch.compile the decode step and, one block for all, the vision tower (compiled.py)."""
        from sharp_cli.compiled import CompiledStack, vision_blocks

        self.compiled, self.compiled_vision = enabled, None
        blocks = vision_blocks(self.model) if enabled else None
        if blocks is not None:
            self.compiled_vision = CompiledStack(blocks, dynamic=None)
        return self

    def vision_context(self):
        """What sharp's encoder phase runs the vision tower under: the compiled blocks with --compile,
        else its CUDA graphs per shape where they are on, else the plain tower."""
        from contextlib import nullcontext

        if self.compiled_vision is not None:
            return self.compiled_vision.active()
        return self.vision_graphs.active() if self.vision_graphs is not None else nullcontext()

    def resolve_prune(self, cfg: PruneConfig) -> PruneConfig:
        """cfg with K resolved for this model (PruneConfig.resolved_for through the family's
        adapter): what a command does once per question's options, and the phases assert on."""
        return self.adapter.validate_prune(cfg, self.num_layers)

    @property
    def num_layers(self) -> int:
        return len(self.adapter.decoder_layers(self.model))

    @property
    def dims(self) -> dict:
        return measure.text_dims(self.model.config)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch")
    if device not in ("cuda", "cpu"):
        raise UsageError(f"--device must be auto, cuda or cpu, got '{device}'")
    return torch.device(device)


def resolve_quant(quant: str, device: torch.device, name: str | None = None) -> str:
    if quant == "auto":  # a few-MB model gains nothing from 4 bits, and bitsandbytes' kernels cost
        return "nf4" if device.type == "cuda" and name not in SHIPPED else "none"
    if quant not in ("nf4", "int8", "none"):
        raise UsageError(f"--quant must be auto, nf4, int8 or none, got '{quant}'")
    if quant != "none" and device.type != "cuda":
        raise UsageError(f"--quant {quant} needs a CUDA GPU (bitsandbytes); use --quant none on CPU")
    return quant


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if bf16_native() else torch.float16
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype must be auto, bfloat16, float16 or float32, got '{dtype}'")
    return getattr(torch, dtype)


def bf16_native() -> bool:
    """bfloat16 in hardware (compute capability 8.0 on): T4 and V100 only emulate it, slowly, and
    torch's plain is_bf16_supported() counts emulation as support."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch releases without the argument did not count emulation
        return bool(torch.cuda.is_bf16_supported())


def quantization_config(quant: str, adapter, dtype: torch.dtype = torch.bfloat16):
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise DeviceError(f"--quant {quant} needs bitsandbytes ({exc}); install it or use --quant none") from None
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  # the model's dtype: bf16 where the GPU has it, fp16 (T4, V100) else
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=adapter.skip_modules())
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=adapter.skip_modules())


def model_path(name: str) -> str:
    """`sharp-tiny`, `sharp-small` -> the folder shipped in the package; any other name as given."""
    if name not in SHIPPED:
        return name
    folder, maker = SHIPPED[name]
    if not (folder / "model.safetensors").exists():
        raise ModelError(f"{name} is not in this install ({folder}); {maker} makes it")
    return str(folder)


def read_config(name: str, trust_remote_code: bool):
    from transformers import AutoConfig

    name = model_path(name)
    hub.check_reachable(name)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if not Path(name).exists() and hub.offline():
            raise ModelError(hub.not_cached(name)) from None
        where = "local folder" if Path(name).exists() else "model id"
        raise ModelError(f"cannot load {where} '{name}': {exc}") from None


def saved_video_bound(name: str, *, random_weights: bool = False) -> int | None:
    """The upper bound (pixels a frame) the model's video processor was saved with, read from its
    files before loading (models/budget.py): sharp-tiny's keeps its frames at the size it was
    trained at. None with random weights (the processor is built with the family's defaults)."""
    from sharp_cli.models import budget

    if random_weights:
        return None
    return budget.saved_bound_in(hub.local_folder(model_path(name)))


def model_config(name: str, *, random_weights: bool = False, trust_remote_code: bool = False):
    """The model's config alone (a shipped one with random weights): cheap, before any weights."""
    if random_weights:
        from sharp_cli.models import random_init

        return random_init.load_config(name)
    return read_config(name, trust_remote_code)


def load(name: str = DEFAULT_MODEL, *, device: str = "auto", quant: str = "auto", dtype: str = "auto",
         random_weights: bool = False, trust_remote_code: bool = False) -> Loaded:
    """from_pretrained on a hub id or local folder; or, with random_weights, the same architecture
    built from a shipped config (quantized runs go through a saved folder and from_pretrained).
    Triton's per-process set-up and sharp's kernels' first launches run beside it
    (models/kernel_warmup.py)."""
    from sharp_cli.models import kernel_warmup

    dev = resolve_device(device)
    warming = kernel_warmup.start(dev)
    try:
        return _load_weights(name, dev, quant, dtype, random_weights, trust_remote_code, warming)
    finally:
        kernel_warmup.finish(warming)


def _load_weights(name: str, dev: torch.device, quant: str, dtype: str, random_weights: bool,
                  trust_remote_code: bool, warming=None) -> Loaded:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    requested, name = name, model_path(name)  # reported as given, not as the folder it resolves to
    qmode = resolve_quant(quant, dev, requested)
    tdtype = resolve_dtype(dtype, dev)
    if random_weights:
        from sharp_cli.models import random_init

        config = random_init.load_config(name)
        generation = random_init.load_generation_config(name)
        if qmode == "none":
            if warming is not None:
                warming.shapes(config, tdtype)
            model, processor = random_init.build_random(config, dtype=tdtype, device=dev, generation_config=generation)
            return ready(Loaded(model, processor, adapter_for(config), name, dev, tdtype, qmode, True))
        name = str(_random_folder(name, config, dev, generation))
    config = read_config(name, trust_remote_code)
    adapter = adapter_for(config)
    _check_weights_there(name)
    if warming is not None:  # its kernels warm while the weights load
        warming.shapes(config, tdtype)
    # use_kernels=False: with the `kernels` package installed, transformers >= 5.2x would replace layers
    # with kernels fetched from the hub (a download; offline, an error) unless told not to.
    kwargs = dict(dtype=tdtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code,
                  use_safetensors=True, use_kernels=False)
    qconfig = quantization_config(qmode, adapter, tdtype)
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig)
    if dev.type == "cuda":  # straight onto the GPU, as a plain device_map load does, not through host
        # memory and a .to() after. The current device, not GPU 0: sharded evals set it per rank
        # (torch.cuda.set_device). One device: transformers adds no accelerate hooks.
        kwargs.update(device_map={"": dev.index if dev.index is not None else torch.cuda.current_device()})
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model '{name}': {exc}") from None
    if dev.type != "cuda":
        model.to(dev)
    model.eval()
    return ready(Loaded(model, processor, adapter, requested, dev, tdtype, qmode, random_weights,
                        folder=hub.local_folder(name)))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_weights_there(name: str) -> None:
    """A local folder without safetensors weights: say which case it is (pickled weights only, or no
    weights at all), instead of transformers' "Error no file named model.safetensors found in
    directory" (use_safetensors=True already keeps pickles from being opened)."""
    folder = Path(name)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"cannot load local folder '{name}': its weights are pickled ({', '.join(pickles[:3])}), "
                         "and sharp loads safetensors only (unpickling can run code); convert them to safetensors")
    raise ModelError(f"cannot load local folder '{name}': it has no weights (no *.safetensors file)")


def check_prune_config(name: str, cfg: PruneConfig, *, random_weights: bool = False,
                       trust_remote_code: bool = False, config=None) -> PruneConfig:
    """cfg with K resolved for the model and validated against its depth, from its config alone
    (`config`, when already read), before any heavy work; cfg itself when it is resolved already
    (model_files.check_layer did it from config.json): K is resolved once."""
    if cfg.resolved:
        return cfg
    if config is None:
        config = model_config(name, random_weights=random_weights, trust_remote_code=trust_remote_code)
    return adapter_for(config).validate_prune(cfg, measure.text_dims(config)["layers"])


def _random_folder(name: str, config, device, generation_config=None) -> Path:
    from sharp_cli.models import random_init
    from sharp_cli.prune.prior import cache_dir

    shipped = random_init.packaged_configs().get(name)  # aliases share their architecture's folder
    folder = cache_dir() / "random-models" / (shipped.name if shipped else name.replace("/", "--"))
    if not (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists():
        random_init.write_random_model(config, folder, dtype="bfloat16", device=device,
                                       generation_config=generation_config)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return folder


def _freeze_gc() -> None:
    """A loaded model is ~10^5 long-lived Python objects; moving them out of the collector's view
    keeps full collections from stalling decode steps (CPU-bound in eager transformers)."""
    import gc

    gc.collect()
    gc.freeze()


def use_shape_free_attention_kernels() -> None:
    """Keep SDPA off its cuDNN backend. PyTorch prefers cuDNN on Hopper, and cuDNN builds a plan for
    every new shape: ~40 ms per attention call the first time a length is seen (H200, torch 2.11;
    research/results/h200-decode-profiles-compile.log). Every question has a new length, so a served
    question or a one-off `sharp ask` paid 1-2.5 s of plan building in prefill and the vision tower.
    The flash and memory-efficient kernels need no per-shape setup. peers.stock_attention turns
    cuDNN back on for the stock transformers rows, which measure what plain transformers does."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


def ready_vision(visual, device: torch.device, dtype: torch.dtype):
    """A Qwen vision tower (`model.model.visual`) made sharp's, in place: packed attention, its MLPs
    padded where that pays (gate and up fused with SHARP_VISION_FUSED_MLP=1), its norms and rotary
    embedding through Triton kernels with SHARP_FUSED_VISION=1 (models/fused_vision.py); returns its
    VisionGraphs where they are on, else None. ready() and research/vision_check.py (which builds
    the tower alone) both go through here."""
    from sharp_cli.models import fused_vision, vision_attention, vision_graphs, vision_mlp

    if getattr(visual.config, "_attn_implementation", None) == "sdpa":
        visual.config._attn_implementation = vision_attention.register()
    if vision_mlp.pays_on(device, dtype):
        vision_mlp.pad_gated_mlps(visual, fuse=vision_mlp.fusing())
    if fused_vision.available(device):
        fused_vision.use_fused_vision(visual)
    return vision_graphs.VisionGraphs(visual) if vision_graphs.available(device) else None


def ready(loaded: Loaded) -> Loaded:
    """Route the text model's attention through sharp_sdpa (stock SDPA unless a segment plan is on),
    and a packed vision tower's through one SDPA call per window length instead of one per window;
    its MLPs padded to aligned widths where that pays (models/vision_mlp.py),
    and with SHARP_VISION_GRAPHS=1 on CUDA the tower replayed from a CUDA graph per input shape
    (models/vision_graphs.py); on CUDA the text model's one-token
    products through sharp's matrix-vector kernels (models/gemv.py; with SHARP_GEMV_GROUPS=1 q/k/v
    and gate/up as one product each, models/gemv_groups.py; bitsandbytes' 4-bit layers
    through models/gemv_nf4.py unless SHARP_GEMV_NF4=0), and (unless SHARP_FUSED_STEP=0) its one-token
    norms, rotary embedding and activation through one Triton kernel each (models/fused_step.py)."""
    from sharp_cli.models import fused_step, gemv, gemv_groups, gemv_nf4, quant_check, vision_attention

    name = attention.register()
    text = loaded.adapter.text_model(loaded.model)
    text.config._attn_implementation = name
    visual = vision_attention.vision_tower(loaded.model)
    if visual is not None:
        loaded.vision_graphs = ready_vision(visual, loaded.device, loaded.dtype)
    if gemv.available(loaded.device):
        gemv.use_gemv([text, loaded.adapter.lm_head(loaded.model)])
        if gemv_groups.on():
            gemv_groups.group_products(text)
    if loaded.quant == "nf4" and loaded.device.type == "cuda":
        # Before sharp's kernel replaces the one-row products: this judges bitsandbytes' own.
        line = quant_check.warning(loaded.model)
        if line:
            print(line, file=sys.stderr)
    if gemv_nf4.available(loaded.device):
        gemv_nf4.use_gemv_4bit([text])
    if fused_step.available(loaded.device):
        fused_step.use_fused_step(text)
    from sharp_cli.kv import KVPool

    if loaded.device.type == "cuda":
        use_shape_free_attention_kernels()
    loaded.kv_pool = KVPool()
    _freeze_gc()
    return loaded.use_cuda_graphs(True)
