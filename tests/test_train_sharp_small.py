"""scripts.train_sharp_small on a tiny config on the CPU: a short run saves a model that loads by
transformers' own from_pretrained and continues from it (items offset, history kept; with
--freeze-language only the vision side changes), and the compiled decoder layers (--compile) give
the eager losses and gradients without a graph break."""

from __future__ import annotations

import json

import pytest
import torch

from scripts import small_circuits, small_losses
from scripts import train_sharp_small as train
from scripts.small_data import NONE, TASKS, Batcher, Items, build_processor, pack, small_config, unpack

TINY = ["--device", "cpu", "--batch", "2", "--hidden", "64", "--layers", "3", "--mrope-section", "2,1,1",
        "--workers", "0", "--eval-every", "0", "--check-items", "1", "--language", "0.5", "--tasks", "colour"]


def test_a_short_run_saves_a_model_that_loads_and_continues(tmp_path):
    from transformers import AutoModelForImageTextToText

    first, second = tmp_path / "first", tmp_path / "second"
    train.main(TINY + ["--steps", "2", "--out", str(first)])
    record = json.loads((first / "training.json").read_text())
    assert (record["steps"], record["items_from"], record["items_to"]) == (2, 0, 4)
    assert record["last_check"]["attention"]  # the progress check ran at the end
    sinks = record["last_check"]["language_first_token"]  # every layer's first-token share on language
    assert sorted(sinks) == ["0", "1", "2"] and all(0 < v < 1 for v in sinks.values())
    model = AutoModelForImageTextToText.from_pretrained(first)
    assert model.config.text_config.num_hidden_layers == 3 and model.dtype == torch.float16

    # continued with the language model frozen (a VLM's first stage): only the vision side moves
    train.main(TINY + ["--steps", "1", "--out", str(second), "--init-from", str(first), "--freeze-language",
                       "--language", "0"])
    record = json.loads((second / "training.json").read_text())
    assert (record["items_from"], record["items_to"]) == (4, 6)  # new items, never the first run's again
    assert [h["items_to"] for h in record["history"]] == [4] and record["freeze_language"]
    before, after = (AutoModelForImageTextToText.from_pretrained(f).state_dict() for f in (first, second))
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.startswith("model.visual.") for name in moved), sorted(moved)[:5]


def test_compiled_layers_give_the_eager_losses_and_gradients():
    """aot_eager traces forward and backward as inductor would, without a compiler on the CI."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForImageTextToText

    from sharp_cli.models import vision_attention

    torch.manual_seed(0)
    config = small_config(hidden=64, layers=4, mrope_section=(2, 1, 1))
    config._attn_implementation = "sdpa"
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.model.visual.config._attn_implementation = vision_attention.register()
    none_id = build_processor(config).tokenizer.convert_tokens_to_ids(NONE)
    retrieval = small_losses.LayerRetrieval(3)
    retrieval.register(model)

    def step(rows):
        batch = Batcher(config)(unpack(pack(rows), "cpu"))
        retrieval.arm(batch, config.video_token_id)
        logits = model(**train.inputs_of(batch), use_cache=False).logits  # as the script runs it
        lm, token = small_losses.losses(logits, batch, config.video_token_id, none_id)
        fetch = retrieval.loss(batch, config.video_token_id)
        model.zero_grad()
        (lm + token + fetch).backward()
        return torch.stack([lm, token, fetch]).detach(), [p.grad.clone() for p in model.parameters()]

    items = Items(1000, TASKS, 0.5, 0.3)
    batches = [[items[n] for n in (0, 1, 2)], [items[n] for n in (3, 4)]]  # two lengths
    assert {r["kind"] for r in batches[0]} == {"language", "video"}
    eager = [step(rows) for rows in batches]
    counters.clear()
    try:
        assert train.compile_layers(model, "aot_eager") == 3
        compiled = [step(rows) for rows in batches]
    finally:
        torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one graph for all three layers and both lengths: a guard on the layer (its index read by the
    # retrieval capture) made one a layer, and past torch's limit of 8 the rest ran eagerly
    assert counters["stats"]["unique_graphs"] <= 2
    for (losses_e, grads_e), (losses_c, grads_c) in zip(eager, compiled):
        assert torch.allclose(losses_e, losses_c, atol=1e-5), (losses_e, losses_c)
        for e, c in zip(grads_e, grads_c):
            assert (e is None) == (c is None)
            if e is not None:
                assert torch.allclose(e, c, atol=1e-5, rtol=1e-4)


def test_the_retrieval_loss_trains_the_layer_asked_for_and_never_a_shallow_one(tmp_path):
    """--retrieval-layer moves the loss's capture (and the one eager layer under --compile) to a middle
    layer; a layer <= K+2 is refused before any training."""
    from transformers import AutoModelForImageTextToText

    with pytest.raises(SystemExit, match="layer 5 or deeper"):
        train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "x"), "--retrieval-layer", "1"])
    out = tmp_path / "middle"
    train.main(TINY + ["--layers", "7", "--steps", "1", "--out", str(out), "--retrieval-layer", "5"])
    assert json.loads((out / "training.json").read_text())["retrieval_layers"] == [5]

    model = AutoModelForImageTextToText.from_pretrained(out)
    small_losses.LayerRetrieval(5).register(model)
    layers = model.model.language_model.layers
    assert [layer.self_attn.sharp_retrieval_capture for layer in layers] == [n == 5 for n in range(7)]
    assert train.compile_layers(model, "eager", skip=5) == 6
    assert [layer._compiled_call_impl is None for layer in layers] == [n == 5 for n in range(7)]


@pytest.mark.parametrize("bad", [["--mrope-section", "4,6,6"]])
def test_a_rotary_split_that_does_not_fit_the_head_is_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="must sum to head dim"):
        train.main(TINY + bad + ["--steps", "1", "--out", str(tmp_path / "x")])


def test_held_circuits_stay_as_planted_while_the_rest_learns(tmp_path):
    """--hold-planted puts scripts.plant_priors' entries back after every step: a continued run
    leaves them exactly as planted (weight decay alone would shrink them) and moves the rest."""
    from transformers import AutoModelForImageTextToText

    from scripts import plant_priors

    first, planted, third = tmp_path / "first", tmp_path / "planted", tmp_path / "third"
    train.main(TINY + ["--steps", "1", "--out", str(first)])
    plant_priors.main([str(first), str(planted), "--target", "0.7", "--recency-layers", "1", "--recency-pair", "1",
                       "--rows", "1"])
    circuits = small_circuits.planted_before(planted)
    assert circuits["planted_sinks"]["dimension"] >= 0 and circuits["planted_recency"][0]["layers"] == [1]
    train.main(TINY + ["--steps", "2", "--out", str(third), "--init-from", str(planted), "--hold-planted",
                       "--weight-decay", "0.5", "--lr", "1e-2"])
    assert small_circuits.planted_before(third) == circuits  # found through the continued run's history
    before, after = (AutoModelForImageTextToText.from_pretrained(f, dtype=torch.float32) for f in (planted, third))
    held = small_circuits.held_entries(before, circuits)
    named = {id(p): name for name, p in before.named_parameters()}
    after_params = dict(after.named_parameters())
    for param, index, values in held:
        assert torch.equal(after_params[named[id(param)]].detach().reshape(-1)[index], values), named[id(param)]
    moved = [name for name, p in before.named_parameters() if not torch.equal(p, after_params[name])]
    assert any(name.endswith("q_proj.weight") for name in moved)  # the rest of the same tensors learns


def test_frozen_query_key_layers_keep_where_they_look(tmp_path):
    """--freeze-qk-layers 1: layer 1's query and key projections (and biases) come out as they went
    in, weight decay included, while its values and the other layers' queries learn."""
    from transformers import AutoModelForImageTextToText

    first, second = tmp_path / "first", tmp_path / "second"
    train.main(TINY + ["--steps", "1", "--out", str(first)])
    train.main(TINY + ["--steps", "2", "--out", str(second), "--init-from", str(first), "--freeze-qk-layers", "1",
                       "--weight-decay", "0.5", "--lr", "1e-2"])
    assert json.loads((second / "training.json").read_text())["freeze_qk_layers"] == [1]
    before, after = (AutoModelForImageTextToText.from_pretrained(f).state_dict() for f in (first, second))
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    frozen = [n for n in before if ".layers.1.self_attn." in n and ("q_proj" in n or "k_proj" in n)]
    assert len(frozen) == 4 and not moved & set(frozen)
    assert "model.language_model.layers.1.self_attn.v_proj.weight" in moved
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in moved


def test_a_recency_record_of_one_dict_reads_as_a_list_of_one(tmp_path):
    """p1's record (an older plant_priors) keeps planted_recency as one dict, not a list of them: the
    first --hold-planted run on the GPU stopped on it with a TypeError in held_entries."""
    from transformers import AutoModelForImageTextToText

    recency = {"layers": [1, 2], "rotary_pair": 1}
    (tmp_path / "training.json").write_text(json.dumps({"history": [{"planted_recency": recency}]}))
    planted = small_circuits.planted_before(tmp_path)
    assert planted == {"planted_recency": [recency]}
    model = AutoModelForImageTextToText.from_config(small_config(hidden=64, layers=3, mrope_section=(2, 1, 1)))
    assert len(small_circuits.held_entries(model, planted)) == 8  # q and k, weight and bias, of layers 1 and 2


def test_the_visual_drop_hides_the_video_from_the_deep_layers_text_only(tmp_path):
    """--drop-visual-share 1: from --drop-visual-from on, the text after the video reads nothing of the
    visual tokens (a change to their hidden states there moves no text logit), while the visual rows'
    own logits stay as they were (the per-token loss is unchanged) and the layers before still read
    the video. Share 0 is the model as it was."""
    from transformers import AutoModelForImageTextToText

    from sharp_cli.models import vision_attention

    torch.manual_seed(0)
    config = small_config(hidden=64, layers=4, mrope_section=(2, 1, 1))
    config._attn_implementation = "sdpa"
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    model.model.visual.config._attn_implementation = vision_attention.register()
    items = Items(1000, TASKS, 0.0, 0.3)
    batch = Batcher(config)(unpack(pack([items[0], items[1]]), "cpu"))
    ids = batch["input_ids"]
    visual = ids == config.video_token_id
    positions = torch.arange(ids.shape[1])
    last = torch.where(visual, positions, -1).amax(1, keepdim=True)
    text = (positions > last) & batch["attention_mask"].bool()  # the question and answer after the video

    def logits(share, nudged_layer=None):
        retrieval = small_losses.LayerRetrieval(1, drop_from=2, drop_share=share)
        retrieval.register(model)
        retrieval.arm(batch, config.video_token_id)

        def nudge(module, args, kwargs):  # the visual tokens' hidden states, changed at this layer's input
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hidden = hidden + 3.0 * visual.unsqueeze(-1)
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        layers = model.model.language_model.layers
        hook = layers[nudged_layer].register_forward_pre_hook(nudge, with_kwargs=True) if nudged_layer else None
        try:
            with torch.no_grad():
                return model(**train.inputs_of(batch), use_cache=False).logits
        finally:
            if hook:
                hook.remove()

    def moved(a, b, where):
        return (a[where] - b[where]).abs().max().item()

    plain, dropped = logits(0.0), logits(1.0)
    assert moved(plain, dropped, ~text) < 1e-5 and moved(plain, dropped, text) > 1e-3
    assert moved(dropped, logits(1.0, nudged_layer=2), text) < 1e-5  # the deep text sees no visual state
    assert moved(dropped, logits(1.0, nudged_layer=1), text) > 1e-3  # layer 1 still reads the video
    assert moved(plain, logits(0.0, nudged_layer=2), text) > 1e-3  # without the drop, layer 2 does too

    with pytest.raises(SystemExit, match="--drop-visual-from 2"):  # at the retrieval layer: refused
        train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "x"), "--drop-visual-share", "0.5",
                           "--drop-visual-from", "2"])
    out = tmp_path / "drop"
    train.main(TINY + ["--layers", "7", "--steps", "1", "--out", str(out), "--retrieval-layer", "5",
                       "--drop-visual-share", "0.5", "--drop-visual-from", "6"])
    record = json.loads((out / "training.json").read_text())
    assert (record["drop_visual_share"], record["drop_visual_from"]) == (0.5, 6)
