"""sharp's fused decode-step kernels (models/fused_step.py: RMSNorm, rotary embedding, SiLU * up)
against transformers' own modules, run by Triton's CPU interpreter in a subprocess (the interpreter
is chosen when Triton compiles): each kernel on shapes that fill no block, in float32 and bf16;
whole decoder layers of the three text-model kinds with the kernels swapped in; greedy answers of a
tiny Qwen2.5-VL through them; and the paths that must stay stock (prefill, the CPU, torch.compile).

Tolerances: the interpreter rounds float32 to bf16 by truncation where a GPU rounds to nearest, so
in bf16 each rounding the kernel shares with the stock code may land one bf16 step (2^-7 of the
value) apart; in float32 only the order of the float32 sums differs. The rotary kernel rounds
through the bits (fused_kernels.round_to), so it must equal the stock code exactly in every dtype."""

from __future__ import annotations

import pytest

from conftest import triton_interpreted

pytest.importorskip("triton")

def _interpreted(code: str, **env_extra) -> str:
    return triton_interpreted(code, SHARP_FUSED_STEP="1", **env_extra)


def test_each_kernel_equals_the_stock_code_on_awkward_shapes():
    out = _interpreted("""
        import torch
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
        from sharp_cli.models import fused_step as fs
        torch.manual_seed(0)
        step = 2 ** -7  # one bf16 rounding, relative
        for dtype, rel in ((torch.float32, 1e-6), (torch.bfloat16, 2 * step)):
            # RMSNorm: rows of a width that fills no block, a weight far from ones, an eps that matters
            for rows, n, eps in ((3, 100, 1e-6), (1, 64, 1e-6), (4, 16, 0.5)):
                norm = qwen.Qwen2_5_VLRMSNorm(n, eps=eps)
                norm.weight.data = torch.randn(n) * 2
                norm = norm.to(dtype)
                x = (torch.randn(rows, 1, n) * 3).to(dtype)
                ours, stock = fs.rms_norm(x, norm.weight, eps), norm(x)
                assert ours.shape == stock.shape and ours.dtype == stock.dtype
                err = (ours.double() - stock.double()).abs()
                assert (err <= stock.double().abs() * rel + 1e-6).all(), (dtype, rows, n, err.max())
            # a float32 weight on bf16 rows: transformers' output is float32
            norm = qwen.Qwen2_5_VLRMSNorm(40)
            x = torch.randn(1, 1, 40).to(dtype)
            assert fs.rms_norm(x, norm.weight, 1e-6).dtype == norm(x).dtype == torch.float32
            # rotary: q and k as the attention module views them (b, heads, 1, d) (strided views of
            # (b, 1, heads, d)), grouped kv heads, cos/sin per sequence or one for the batch
            for b, hq, hk, d, cos_b in ((2, 4, 2, 16, 2), (1, 3, 1, 10, 1), (3, 2, 2, 6, 1)):
                q = torch.randn(b, 1, hq, d).to(dtype).transpose(1, 2)
                k = torch.randn(b, 1, hk, d).to(dtype).transpose(1, 2)
                cos, sin = torch.randn(cos_b, 1, d).to(dtype), torch.randn(cos_b, 1, d).to(dtype)
                ours = fs.rotary(q, k, cos, sin)
                stock = qwen.apply_rotary_pos_emb(q, k, cos, sin)
                for o, s in zip(ours, stock):  # bit-equal: every rounding is the stock code's
                    assert o.shape == s.shape and o.dtype == s.dtype
                    assert torch.equal(o, s), (dtype, b, hq, hk, d, int((o != s).sum()))
            # SiLU(gate) * up over more than one block, with a masked tail
            for n in (3000, 7):
                g, u = (torch.randn(1, 1, n) * 4).to(dtype), torch.randn(1, 1, n).to(dtype)
                ours, stock = fs.silu_mul(g, u), torch.nn.functional.silu(g) * u
                err = (ours.double() - stock.double()).abs()
                assert (err <= stock.double().abs() * rel + 1e-6).all(), (dtype, n, err.max())
        print("ok")
    """)
    assert out.strip() == "ok"


def test_decoder_layers_with_the_kernels_equal_the_stock_layers():
    """Every norm, MLP and attention module of Qwen2.5-VL, Qwen3-VL (q/k norms, interleaved M-RoPE)
    and LLaVA-OneVision's Qwen2 is swapped; a one-token step through a layer over a cache of 4
    earlier tokens (two sequences, M-RoPE positions that differ per section) launches each kernel
    and gives the stock layer's output;
    prefill and the layer under torch.compile launch none and give exactly the stock output."""
    out = _interpreted("""
        import torch
        from transformers import DynamicCache
        from sharp_cli.compat import cache_kwargs
        from sharp_cli.models import fused_step as fs, gemv
        from sharp_cli.models.random_init import build_random, tiny_config

        launched = []
        for name in ("rms_norm", "rotary", "silu_mul"):
            plain = getattr(fs, name)
            setattr(fs, name, lambda *a, _n=name, _f=plain, **k: launched.append((_n, a[0].shape)) or _f(*a, **k))

        # two layers: two norms each (Qwen3-VL: and q_norm, k_norm), the final norm, MLPs, attention modules
        expected = {"qwen2.5-vl": 2 * 2 + 1 + 2 + 2, "qwen3-vl": 2 * 4 + 1 + 2 + 2,
                    "llava-onevision": 2 * 2 + 1 + 2 + 2}
        for family, swaps in expected.items():
            for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -5)):
                model, _ = build_random(tiny_config(family, layers=2), dtype="float32")
                text = model.model.language_model
                text.to(dtype)
                assert fs.use_fused_step(text) == swaps, family
                assert fs.use_fused_step(text) == 0  # a second call swaps nothing twice
                layer = text.layers[0]
                torch.manual_seed(1)
                def embeddings(hidden, first):
                    positions = torch.arange(first, first + hidden.shape[1]).expand(hidden.shape[0], -1)
                    if family != "llava-onevision":  # M-RoPE: temporal, height, width positions apart
                        positions = torch.stack([positions, positions + 3, positions * 2])
                    return text.rotary_emb(hidden, positions)

                def past(batch):
                    # 4 earlier tokens in a cache (prefill: stock code), so that the step's q and k,
                    # and so the rotary embedding, decide its output (alone, a token sees only itself)
                    cache = DynamicCache(config=text.config)
                    early = torch.randn(batch, 4, text.config.hidden_size, generator=torch.Generator().manual_seed(2))
                    early = early.to(dtype)
                    layer(early, position_embeddings=embeddings(early, 3), use_cache=True, **cache_kwargs(layer, cache))
                    return cache

                for tokens, batch in ((1, 2), (5, 1)):
                    hidden = torch.randn(batch, tokens, text.config.hidden_size).to(dtype)
                    cos_sin = embeddings(hidden, 7)
                    with torch.no_grad():
                        caches = (past(batch), past(batch)) if tokens == 1 else (None, None)
                        launched.clear()
                        ours = layer(hidden, position_embeddings=cos_sin, **cache_kwargs(layer, caches[0]))
                        kinds = {n for n, _ in launched}
                        with gemv.stock_linears(model):
                            stock = layer(hidden, position_embeddings=cos_sin, **cache_kwargs(layer, caches[1]))
                    if tokens == 1:
                        assert kinds == {"rms_norm", "rotary", "silu_mul"}, (family, kinds)
                        scale = stock.double().abs().max()
                        assert ((ours.double() - stock.double()).abs() <= scale * rel).all(), (family, dtype)
                    else:
                        assert not launched and torch.equal(ours, stock), family
                launched.clear()
                hidden = torch.randn(1, 1, text.config.hidden_size).to(dtype)
                cos_sin = text.rotary_emb(hidden, torch.tensor([[4]]))
                compiled = torch.compile(layer, fullgraph=True, backend="eager")
                with torch.no_grad():
                    ours = compiled(hidden, position_embeddings=cos_sin)
                    with gemv.stock_linears(model):
                        stock = layer(hidden, position_embeddings=cos_sin)
                assert not launched and torch.equal(ours, stock), family
                torch._dynamo.reset()
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_the_rotary_kernel_without_the_kernels_package():
    """Without the `kernels` package (the GPU image leaves it out) transformers' apply_rotary_pos_emb
    is a plain function and the attention module holds no per-module copy: the step still takes the
    kernel, and the layer still gives the stock output."""
    out = _interpreted("""
        import transformers.utils as utils, transformers.utils.import_utils as import_utils
        import_utils.is_kernels_available = utils.is_kernels_available = lambda *a, **k: False
        import torch
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
        from sharp_cli.models import fused_step as fs, gemv
        from sharp_cli.models.random_init import build_random, tiny_config

        assert type(qwen.apply_rotary_pos_emb).__name__ == "function"
        launched = []
        plain = fs.rotary
        fs.rotary = lambda *a, **k: launched.append(1) or plain(*a, **k)
        model, _ = build_random(tiny_config("qwen2.5-vl", layers=1), dtype="bfloat16")
        text = model.model.language_model
        assert fs.use_fused_step(text) == 5 and not hasattr(text.layers[0].self_attn, "_kernel_funcs")
        hidden = torch.randn(1, 1, 64).bfloat16()
        cos_sin = text.rotary_emb(hidden, torch.tensor([[3]]))
        with torch.no_grad():
            ours = text.layers[0](hidden, position_embeddings=cos_sin)
            with gemv.stock_linears(model):
                stock = text.layers[0](hidden, position_embeddings=cos_sin)
        assert launched == [1], launched
        assert (ours.float() - stock.float()).abs().max() <= stock.float().abs().max() * 2 ** -5
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_greedy_answers_through_the_kernels_equal_the_stock_answers():
    """A tiny Qwen2.5-VL in bf16 loaded with SHARP_FUSED_STEP=1: every decode step's norms, rotary
    and activation go through the kernels (one token each, never the prefill), and the greedy tokens,
    unpruned and pruned, are those of the same model with every module back to its stock class."""
    out = _interpreted("""
        import torch
        from conftest import make_clip
        from sharp_cli import loading
        from sharp_cli.answer import ask
        from sharp_cli.models import adapter_for, fused_step as fs, gemv
        from sharp_cli.models.random_init import build_random, tiny_config
        from sharp_cli.prune import PruneConfig

        config = tiny_config("qwen2.5-vl", layers=4)
        model, processor = build_random(config, dtype="bfloat16")
        loaded = loading.ready(loading.Loaded(model, processor, adapter_for(config), "tiny-bf16",
                                              torch.device("cpu"), torch.bfloat16, "none", True))
        fused = [m for m in loaded.model.modules() if type(m).__name__.startswith("Fused")]
        assert len(fused) == 4 * 4 + 1, len(fused)  # per layer two norms, the MLP, attention; the final norm
        assert not any(type(m).__name__.startswith("Fused") for m in loaded.model.model.visual.modules())
        shapes = []
        for name in ("rms_norm", "rotary", "silu_mul"):
            plain = getattr(fs, name)
            setattr(fs, name, lambda *a, _n=name, _f=plain, **k: shapes.append((_n, a[0].shape)) or _f(*a, **k))
        clip, pixels, tokens = make_clip(seed=1), 56 * 56 * 4, 10
        for method in (PruneConfig(method="none"), PruneConfig(method="sharp", layer=2, ratio=0.3)):
            shapes.clear()
            config = loaded.resolve_prune(method)
            ours = ask(loaded, clip, "what colour?", config, max_new_tokens=tokens, max_pixels=pixels)
            assert len(shapes) >= (len(ours.tokens) - 1) * (4 * 4 + 1), (len(shapes), ours.tokens)  # each step, layer
            # one token each, never the prefill: (1, 1, width) rows, q (1, heads, 1, head_dim)
            assert all(s[2 if n == "rotary" else 1] == 1 for n, s in shapes), set(shapes)
            with gemv.stock_linears(loaded.model):
                assert not any(type(m).__name__.startswith("Fused") for m in loaded.model.modules())
                shapes.clear()
                stock = ask(loaded, clip, "what colour?", config, max_new_tokens=tokens, max_pixels=pixels)
                assert not shapes
            assert ours.tokens == stock.tokens, (method.method, ours.tokens, stock.tokens)
        print("ok")
    """, SHARP_GEMV="0", SHARP_FUSED_VISION="0")  # the text step alone: the tower's kernels are on by default
    assert out.strip().endswith("ok")


def test_the_switch_and_the_cpu_path(monkeypatch):
    """On by default for CUDA only, SHARP_FUSED_STEP=0 turns it off; swapped modules on the CPU (no
    interpreter) run the stock code, in bf16 too."""
    import torch

    from sharp_cli.models import fused_step as fs
    from sharp_cli.models import gemv
    from sharp_cli.models.random_init import build_random, tiny_config

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("SHARP_FUSED_STEP", raising=False)
    monkeypatch.setattr(fs, "INTERPRETED", False)
    assert fs.available(cuda) and not fs.available(cpu)
    monkeypatch.setenv("SHARP_FUSED_STEP", "0")
    assert not fs.available(cuda)
    monkeypatch.setenv("SHARP_FUSED_STEP", "1")
    assert fs.available(cuda) and not fs.available(cpu)

    def refuse(*a, **k):
        raise AssertionError("a kernel ran on the CPU")

    monkeypatch.setattr(fs, "_kernels", refuse)
    model, _ = build_random(tiny_config("qwen2.5-vl", layers=2), dtype="bfloat16")
    text = model.model.language_model
    assert fs.use_fused_step(text) == 2 * 4 + 1
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        ours = [text(input_ids=ids).last_hidden_state, text(input_ids=ids[:, :1]).last_hidden_state]
        with gemv.stock_linears(model):
            stock = [text(input_ids=ids).last_hidden_state, text(input_ids=ids[:, :1]).last_hidden_state]
    assert all(torch.equal(a, b) for a, b in zip(ours, stock))
