"""scripts.pretrain_small_lm: its batched draw of sharp-small's language against the grammar's own
one-word-at-a-time sampler (scripts/small_data.Grammar.text, the language stage's reference), the
trigger rule, and a short CPU run (documents and chat rows) that saves a whole model whose language
model alone has learned and that continues on new chat items."""

from __future__ import annotations

import json

import numpy as np
import torch

from scripts import pretrain_small_lm as pretrain
from scripts.small_data import Grammar, build_processor, small_config


def _language(triggers: float):
    config = small_config(hidden=64, layers=2, mrope_section=(2, 1, 1))
    return pretrain.Language(build_processor(config).tokenizer, torch.device("cpu"), triggers)


def _successor_share(g: Grammar, seqs) -> float:
    """Share of transitions where the word is one of the previous word's 6 likely successors."""
    hits = total = 0
    for seq in seqs:
        for prev, word in zip(seq[:-1], seq[1:]):
            hits += word in g.next[prev]
            total += 1
    return hits / total


def test_the_batched_language_draws_what_the_grammar_draws():
    g = Grammar()
    index = {w: i for i, w in enumerate(g.words)}
    references = [[[index[w] for w in g.text(np.random.default_rng([seed, n]), 400)] for n in range(20)]
                  for seed in (0, 1)]
    ours = _language(0.0).documents(20, 400, torch.Generator().manual_seed(0)).tolist()
    # a successor half the time, and by chance otherwise (6 of 640 words, Zipf-weighted): ~0.52
    assert abs(_successor_share(g, ours) - _successor_share(g, references[0])) < 0.03

    def frequencies(seqs):
        return np.bincount(np.concatenate([np.array(s) for s in seqs]), minlength=len(g.words)) / (20 * 400)

    # the same word frequencies: ours as far from a reference sample as two reference samples are
    noise = np.abs(frequencies(references[0]) - frequencies(references[1])).sum()
    assert np.abs(frequencies(ours) - frequencies(references[0])).sum() < 1.5 * noise


def test_a_trigger_is_followed_by_the_word_its_number_places_before_it():
    lang = _language(0.1)
    docs = lang.documents(8, 300, torch.Generator().manual_seed(1))
    first = int(lang.trigger_words[0])
    checked = 0
    for seq in docs.tolist():
        for t in range(10, len(seq) - 1):
            if seq[t] >= first:
                assert seq[t + 1] == seq[t - (seq[t] - first + 1)], (t, seq[t - 9:t + 2])
                checked += 1
    assert checked > 100
    ids = next(lang.batches(3, 64, torch.Generator().manual_seed(2), ahead=2))
    assert ids.shape == (3, 64) and torch.equal(ids[:, :len(lang.prompt)], lang.prompt.expand(3, -1))


def test_a_short_run_trains_the_language_model_alone_and_saves_it(tmp_path):
    from transformers import AutoModelForImageTextToText

    args = ["--device", "cpu", "--hidden", "64", "--layers", "2", "--mrope-section", "2,1,1", "--batch", "2",
            "--length", "96", "--check-items", "1", "--eval-every", "0", "--workers", "0", "--chat-share", "0.5"]
    first, second = tmp_path / "first", tmp_path / "second"
    pretrain.main(args + ["--steps", "2", "--out", str(first)])
    pretrain.main(args + ["--steps", "1", "--out", str(second), "--init-from", str(first)])
    record = json.loads((second / "training.json").read_text())
    assert record["lm_tokens"] == 3 * 2 * 96 and len(record["history"]) == 1
    assert (record["items_from"], record["items_to"]) == (2, 3)  # a chat row a step, never one twice
    assert set(record["log"][-1]["first_token"]) == set(record["log"][-1]["first_token_documents"]) == {"0", "1"}
    before, after = (AutoModelForImageTextToText.from_pretrained(f).state_dict() for f in (first, second))
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert "lm_head.weight" in moved and any("language_model.layers.1." in n for n in moved)
    assert not any(name.startswith("model.visual.") for name in moved)
