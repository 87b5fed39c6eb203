"""answer.run, the question pipeline as one timed pass: EOS ignored means exactly N tokens, and the
tokens are transformers' greedy ones."""

from __future__ import annotations

import torch

from conftest import make_clip
from sharp_cli import answer, engine
from sharp_cli.peers import stock_attention
from sharp_cli.prune import PruneConfig

QUESTION = "what colour is the ball?"
PIXELS = 56 * 56 * 4


def _generate(loaded, clip, new_tokens):
    """transformers' greedy tokens, made to run exactly new_tokens (EOS suppressed until then)."""
    inputs = engine.prepare(loaded, clip, QUESTION, PIXELS)
    with stock_attention(loaded), torch.inference_mode():
        out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_ignore_eos_decodes_exactly_n_tokens_as_generate_does(tiny):
    clip, n = make_clip(seed=2), 10
    cfg = tiny.resolve_prune(PruneConfig(method="none"))
    reference = _generate(tiny, clip, n)
    assert len(reference) == n
    gen = tiny.model.generation_config
    saved = gen.eos_token_id
    gen.eos_token_id = [reference[3]]  # the fourth token now ends an answer
    try:
        stopped = answer.run(tiny, clip, QUESTION, cfg, n, max_pixels=PIXELS)
        ignored = answer.run(tiny, clip, QUESTION, cfg, n, max_pixels=PIXELS, ignore_eos=True)
    finally:
        gen.eos_token_id = saved
    assert stopped.tokens == reference[:4] and stopped.decoded.stop == "eos"
    assert ignored.tokens == reference and ignored.decoded.stop == "length"


def test_a_pass_reports_each_phase_and_prefill_only_decodes_nothing(tiny):
    clip = make_clip(seed=1)
    cfg = tiny.resolve_prune(PruneConfig(method="sharp", ratio=0.25, layer=2))
    done = answer.run(tiny, clip, QUESTION, cfg, 3, max_pixels=PIXELS, ignore_eos=True)
    asked = answer.ask(tiny, clip, QUESTION, cfg, max_new_tokens=3, max_pixels=PIXELS)
    assert done.tokens[:len(asked.tokens)] == asked.tokens and len(done.tokens) == 3
    assert torch.equal(done.prefill.kept, asked.prefill.kept)
    assert done.prepare_seconds > 0 and done.vision_seconds > 0 and done.prefill.seconds > 0
    assert done.seconds >= done.vision_seconds + done.prefill.seconds
    first = answer.run(tiny, clip, QUESTION, cfg, 0, max_pixels=PIXELS, room=6)
    assert first.decoded is None and first.tokens == [] and first.decode_seconds == 0.0
    assert torch.equal(first.prefill.logits, done.prefill.logits)
