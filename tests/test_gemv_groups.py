"""models/gemv_groups.py under Triton's interpreter (a subprocess: the interpreter is chosen when
Triton compiles): grouped q/k/v and gate/up products give the stock answers with fewer launches, the
parameters become views of one tensor with the same values, and a member called out of turn or on
another input computes its own product."""

from __future__ import annotations

import pytest

from conftest import triton_interpreted

pytest.importorskip("triton")


def test_grouped_products_answer_as_stock_with_two_launches_a_layer():
    out = triton_interpreted("""
        import torch
        from conftest import make_clip
        from sharp_cli import loading
        from sharp_cli.answer import ask
        from sharp_cli.models import adapter_for, gemv, gemv_groups
        from sharp_cli.models.random_init import build_random, tiny_config
        from sharp_cli.prune import PruneConfig

        import collections
        layers = 3
        config = tiny_config("qwen2.5-vl", layers=layers)
        text = config.text_config
        width, inner = text.hidden_size, text.intermediate_size
        kv = text.num_key_value_heads * width // text.num_attention_heads
        model, processor = build_random(config, dtype="bfloat16")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loaded = loading.ready(loading.Loaded(model, processor, adapter_for(config), "tiny", torch.device("cpu"),
                                              torch.bfloat16, "none", True))
        attention = loaded.model.model.language_model.layers[0].self_attn
        members = (attention.q_proj, attention.k_proj, attention.v_proj)
        storages = {p.weight.untyped_storage().data_ptr() for p in members}
        assert len(storages) == 1 and type(attention.k_proj).__name__ == "GroupedGemvLinear"
        after = loaded.model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

        launches = []
        plain = gemv.gemv
        gemv.gemv = lambda x, weight, *a, **k: launches.append(weight.shape[0]) or plain(x, weight, *a, **k)
        clip, pixels, tokens = make_clip(seed=3), 56 * 56 * 4, 4
        for method in (PruneConfig(method="none"), PruneConfig(method="sharp", layer=2, ratio=0.3)):
            cfg = loaded.resolve_prune(method)
            launches.clear()
            ours = ask(loaded, clip, "what colour?", cfg, max_new_tokens=tokens, max_pixels=pixels)
            steps = len(ours.tokens) - 1
            # per step and layer: q/k/v one product, gate/up one, o and down their own; k and v never
            # alone (sharp's scoring at layer K asks layer K's q for the question's last row: one more q/k/v)
            rows = collections.Counter(launches)
            assert rows[width] == 2 * steps * layers and rows[2 * inner] == steps * layers, rows
            assert rows[kv] == 0 and rows[width + 2 * kv] >= steps * layers, rows
            with gemv.stock_linears(loaded.model):
                stock = ask(loaded, clip, "what colour?", cfg, max_new_tokens=tokens, max_pixels=pixels)
            assert ours.tokens == stock.tokens, (method.method, ours.tokens, stock.tokens)

        # out of turn: a follower first, or on another input, makes its own product; the lead's parts
        # are then taken once each
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        x, other = torch.randn(1, 1, q.in_features).bfloat16(), torch.randn(1, 1, q.in_features).bfloat16()
        reference = [torch.nn.functional.linear(t, m.weight, m.bias) for t, m in ((x, q), (x, k), (other, v))]
        launches.clear()
        first_k = k(x)
        assert launches == [k.out_features]
        got = [q(x), k(x), v(other)]
        assert launches == [k.out_features, q.out_features + k.out_features + v.out_features, v.out_features]
        for mine, ref in zip([first_k] + got, reference[1:2] + reference):
            torch.testing.assert_close(mine, ref, rtol=2 ** -7, atol=1e-3)
        assert q.group.input is not None and q.group.waiting == {2}  # v's part not taken: kept for it
        print("ok")
    """, SHARP_GEMV_GROUPS="1", SHARP_FUSED_STEP="1")
    assert out.strip().endswith("ok")
