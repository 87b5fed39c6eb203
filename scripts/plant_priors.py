"""Give sharp-small the two habits of a real LLM's attention that its training never grew: attention
sinks, and recency from RoPE. Both are built into a trained checkpoint as circuits of Qwen2.5-VL's
own weights; training then keeps, reshapes or removes them (the weights stay free).

Why planted: in every run so far (docs/eval.md, "sharp-small") no sink emerged from language
training, from 14M tokens on the CPU to 55.6M at full size on a GPU, while published sinks need
billions; and the recency check (half of the top attention in the last eighth of the frames) stayed
at 0.04-0.20.

Sinks, the way real models carry them (Sun et al., "Massive activations"; Gu et al., "When attention
sink emerges"): a hidden dimension hundreds of times the rest at one early token, so that after
RMSNorm that token is a fixed vector whose key every query meets with a large logit, and whose value
is near zero (attention parked there is a no-op). In the weights (hidden d, head dim h, rotary pair
p = h/2 - 1, the slowest frequency, under 0.01 rad over the longest sequence at theta 1e6):
  - one hidden dimension j (the least used by the token embeddings) is MASSIVE at the sink token
    (the `system` of the system turn, position 1 of every prompt) and 0 at every other token; no
    layer writes it (o_proj and down_proj row j, the vision merger's output row j are zeroed), so it
    stays so at every layer, and after RMSNorm the sink is sqrt(d) e_j;
  - no projection but the planted key reads j (q, k, v, gate and up columns j are 0), so the sink's
    own layers leave its state alone;
  - at layers >= FROM_LAYER: key dim p reads only j, key dim p + h/2 is 0, so only the sink has a key
    in that pair; query dim p is a constant per head (weight 0, bias), calibrated so that the head
    gives the sink TARGET of the last prompt token's attention on the progress-check rows (seed 999);
  - v_proj column j is 0, so attention parked on the sink only scales the rest down by (1 - share);
    o_proj's columns of each head are scaled by 1 / (1 - TARGET) to start near the old function.

Recency, the way RoPE gives it: a constant key component and a constant query component in one
rotary pair of the temporal band add A cos(theta (m - n) + pi/2) = -A sin(theta (m - n)) to the logit
of query position m on key position n: rising with the key's position over |theta (m - n)| < pi/2
(an ALiBi-like slope), for text and visual keys alike. It needs a slow temporal frequency: with
Qwen2.5-VL's text after a video placed from the end of its spatial grid, the last prompt token sits
some 50-70 positions after the first frame and up to ~20 before the last (sharp-small at 64 frames),
a span of ~100 positions, so theta <= ~0.015. sharp-small's bands 4,6,6 give the temporal band
1, 0.42, 0.18, 0.075 rad a position (no pair is monotone over the span); `--mrope-section 8,4,4`
moves frequencies 4-7 (0.032, 0.013, 0.0056, 0.0024) into it. That changes only how visual tokens
rotate (a text token has one position in all three bands), and the training that follows re-learns
it. The slope is SLOPE logits a token frame (2 positions at sharp-small's 8 fps) at m = n, at the
layers in RECENCY_LAYERS.

Usage: python -m scripts.plant_priors IN_FOLDER OUT_FOLDER [--target 0.85] [--from-layer 2]
       [--mrope-section 8,4,4] [--recency-layers 1,2] [--slope 0.5 | --slope 0.25,0] [--recency-pair 5]
A checkpoint planted before (its training.json says so) keeps its sink circuit: its heads are only
calibrated again to the target; --recency-layers with --slope sets each layer's recency anew.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from scripts.small_checks import inputs_of, language_check_rows, to_device
from scripts.small_circuits import planted_before
from scripts.small_data import CHECK_SEED, TASKS, Batcher, Items, build_processor, pack, unpack
from scripts.train_sharp_small import history_of
from sharp_cli.evaluate import diagnose

SINK_TOKEN = "system"
MASSIVE = 16384.0


def text_parts(model):
    return model.model.language_model, model.config.text_config


@torch.no_grad()
def plant_sinks(model, token_id: int, target: float, from_layer: int, key_scale: float = 8.0) -> dict:
    """Build the sink circuit (module docstring) into `model` in place; returns what was chosen. Each
    head's logit on the sink is set by `calibrate_sinks`."""
    lm, tc = text_parts(model)
    d, heads, kv = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads
    hd = d // heads
    p = hd // 2 - 1
    emb = lm.embed_tokens.weight  # (V, d)
    j = int(emb.float().abs().mean(0).argmin())
    # The residual stream of a trained sharp-small reaches norms of ~200-1,200 (every token); 16,384
    # keeps the sink's state >99% e_j at every layer and leaves fp16 (max 65,504) room; RMSNorm
    # squares in fp32.
    massive = MASSIVE
    emb[:, j] = 0
    emb[token_id, j] = massive
    merger_out = model.model.visual.merger.mlp[-1]
    merger_out.weight[j] = 0
    if merger_out.bias is not None:
        merger_out.bias[j] = 0
    normed = math.sqrt(d)  # RMSNorm of a state that is all e_j: sqrt(d) e_j (times the norm's weight)
    for n, layer in enumerate(lm.layers):
        layer.self_attn.o_proj.weight[j] = 0
        layer.mlp.down_proj.weight[j] = 0
        layer.input_layernorm.weight[j] = 1.0
        layer.post_attention_layernorm.weight[j] = 1.0
        # nothing but the planted key reads j: the sink's own MLP and attention see only its other,
        # normalised-away dimensions, so its state stays e_j (and layers < from_layer see no sink)
        layer.mlp.gate_proj.weight[:, j] = 0
        layer.mlp.up_proj.weight[:, j] = 0
        att = layer.self_attn
        for proj in (att.q_proj, att.k_proj, att.v_proj):
            proj.weight[:, j] = 0
        if n < from_layer:
            continue
        for g in range(kv):
            for dim in (g * hd + p, g * hd + p + hd // 2):
                att.k_proj.weight[dim] = 0
                att.k_proj.bias[dim] = 0
            att.k_proj.weight[g * hd + p, j] = key_scale / normed
        for h in range(heads):
            for dim in (h * hd + p, h * hd + p + hd // 2):
                att.q_proj.weight[dim] = 0
                att.q_proj.bias[dim] = 0
            att.o_proj.weight[:, h * hd:(h + 1) * hd] /= 1 - target
    return {"token": SINK_TOKEN, "token_id": token_id, "dimension": j, "massive": massive,
            "target": target, "from_layer": from_layer, "rotary_pair": p, "key": key_scale}


def constant_pair(att, pair: int, key: tuple, query: tuple, heads: int, kv: int, hd: int) -> None:
    """Every key and every query of `att` constant in rotary pair `pair` (dims pair, pair + hd/2):
    the projections' weight rows zeroed and their biases set to `key` (each KV head) and `query`
    (each query head), so the pair adds a function of the key-minus-query position alone."""
    for proj, count, value in ((att.k_proj, kv, key), (att.q_proj, heads, query)):
        for g in range(count):
            for dim, v in zip((g * hd + pair, g * hd + pair + hd // 2), value):
                proj.weight[dim] = 0
                proj.bias[dim] = v


@torch.no_grad()
def plant_recency(model, layers, pair: int, slope: float, positions_per_frame: float = 2.0,
                  key: float = 8.0) -> dict:
    """Build the recency circuit (module docstring) into `model` in place at `layers`: in rotary
    pair `pair` (which must be in the temporal band) every key is the constant (key, 0) and every
    query the constant (0, c), so the logit gains -key * c * scaling * sin(theta (m - n))."""
    lm, tc = text_parts(model)
    heads, kv = tc.num_attention_heads, tc.num_key_value_heads
    hd = tc.hidden_size // heads
    section = tc.rope_parameters["mrope_section"]
    if not 0 <= pair < section[0]:
        raise ValueError(f"rotary pair {pair} is not in the temporal band (the first {section[0]} of {hd // 2})")
    theta = tc.rope_parameters["rope_theta"] ** (-2 * pair / hd)
    c = slope / (key * theta * positions_per_frame * hd**-0.5)
    for n in layers:
        constant_pair(lm.layers[n].self_attn, pair, (key, 0.0), (0.0, c), heads, kv, hd)
    return {"layers": list(layers), "rotary_pair": pair, "radians_per_position": float(f"{theta:.4g}"),
            "slope_per_frame": slope, "query": round(c, 4), "key": key}


def hinge_terms(thetas: list[float], slope: float, positions_per_frame: float = 2.0, span=(-70, 30),
                ridge: float = 0.01) -> list[tuple[float, float]]:
    """[(a, b)] per rotary frequency: sum_i a_i cos(theta_i d) + b_i sin(theta_i d) ~ slope / positions_per_frame
    * max(0, d) over key-minus-query positions d in `span` (a constant aside): flat before the query,
    rising by `slope` logits a token frame after it. Least squares with a small ridge (slow
    frequencies are nearly collinear: unridged, they cancel at amplitudes of 10^6 logits)."""
    d = torch.arange(span[0], span[1] + 1, dtype=torch.float64)
    target = slope / positions_per_frame * d.clamp_min(0)
    columns = [torch.ones_like(d)] + [f(t * d) for t in thetas for f in (torch.cos, torch.sin)]
    x = torch.stack(columns, 1)
    penalty = ridge * torch.eye(x.shape[1], dtype=torch.float64)
    penalty[0, 0] = 0  # the constant is free: softmax ignores it
    w = torch.linalg.solve(x.T @ x + penalty, x.T @ target)
    return [(float(w[1 + 2 * i]), float(w[2 + 2 * i])) for i in range(len(thetas))]


@torch.no_grad()
def plant_hinge(model, layers, pairs: list[int], slope: float, key: float = 8.0) -> list[dict]:
    """Recency shaped as a hinge on the query's position (module docstring): in each rotary pair of
    `pairs` (temporal band) every key is the constant (key, 0) and every query the constant (qx, qy),
    which adds key * scaling * (qx cos(theta d) + qy sin(theta d)) to the logit of a key d positions
    after the query; the pairs' terms together are hinge_terms'. One record per (layer, pair)."""
    lm, tc = text_parts(model)
    heads, kv = tc.num_attention_heads, tc.num_key_value_heads
    hd = tc.hidden_size // heads
    section = tc.rope_parameters["mrope_section"]
    if not all(0 <= p < section[0] for p in pairs):
        raise ValueError(f"rotary pairs {pairs} are not all in the temporal band (the first {section[0]})")
    thetas = [tc.rope_parameters["rope_theta"] ** (-2 * p / hd) for p in pairs]
    scale = key * hd ** -0.5
    records = []
    for pair, theta, (a, b) in zip(pairs, thetas, hinge_terms(thetas, slope)):
        for n in layers:
            constant_pair(lm.layers[n].self_attn, pair, (key, 0.0), (a / scale, b / scale), heads, kv, hd)
            records.append({"layers": [n], "rotary_pair": pair, "shape": "hinge", "slope_per_frame": slope,
                            "radians_per_position": float(f"{theta:.4g}"), "cos_sin_logits": [round(a, 4), round(b, 4)],
                            "key": key})
    return records


def sink_shares(model, rows, sink_id: int) -> torch.Tensor:
    """(layers, heads): the mean share of the last prompt token's attention on the sink token."""
    lm, tc = text_parts(model)
    layers = list(range(tc.num_hidden_layers))
    batcher = Batcher(model.config, answers=False, device=torch.device("cpu"))
    total = torch.zeros(len(layers), tc.num_attention_heads)
    model.eval()
    for row in rows:
        batch = to_device(batcher(unpack(pack([row]), "cpu")), "cpu")
        at = (batch["input_ids"][0] == sink_id).nonzero()[0, 0]
        with torch.no_grad(), diagnose.capture(lm.config, layers) as rec:
            model(**inputs_of(batch), logits_to_keep=1)
        total += torch.stack([rec.probs[n][0, :, at] for n in layers])
    return total / len(rows)


def planted_key(model, info: dict, layer: int) -> torch.Tensor:
    """(kv heads,): the sink's key in the planted pair at `layer`, as the weights make it now (a
    trained model has moved the key weight, its bias and the norm's weight on j since planting)."""
    lm, tc = text_parts(model)
    hd = tc.hidden_size // tc.num_attention_heads
    j, p = info["dimension"], info["rotary_pair"]
    att = lm.layers[layer].self_attn
    normed = float(lm.layers[layer].input_layernorm.weight[j]) * math.sqrt(tc.hidden_size)
    rows = torch.arange(tc.num_key_value_heads) * hd + p
    return att.k_proj.weight[rows, j].float() * normed + att.k_proj.bias[rows].float()


@torch.no_grad()
def calibrate_sinks(model, rows, info: dict, rounds: int = 4) -> list[list[float]]:
    """Move each planted head's sink logit, from where the weights have it, until its share of the
    last token's attention on `rows` averages the target (a logit step per round: the share is a
    logistic function of it). Works on a freshly planted model and on a trained one alike."""
    lm, tc = text_parts(model)
    hd = tc.hidden_size // tc.num_attention_heads
    group = tc.num_attention_heads // tc.num_key_value_heads
    p, target = info["rotary_pair"], info["target"]
    scaling = hd ** -0.5
    layers = range(info["from_layer"], tc.num_hidden_layers)
    key = {n: planted_key(model, info, n).repeat_interleave(group) * scaling for n in layers}  # (heads,)
    rows_p = torch.arange(tc.num_attention_heads) * hd + p  # each query head's dim p
    logit = {n: lm.layers[n].self_attn.q_proj.bias[rows_p].float() * key[n] for n in layers}
    for round_ in range(rounds + 1):
        for n in layers:
            lm.layers[n].self_attn.q_proj.bias[rows_p] = logit[n] / key[n]
        share = sink_shares(model, rows, info["token_id"]).clamp(1e-4, 1 - 1e-4)
        if round_ < rounds:
            for n in layers:
                logit[n] += math.log(target / (1 - target)) - (share[n] / (1 - share[n])).log()
    return [[round(float(s), 3) for s in row] for row in share]


def main(argv=None):
    from transformers import AutoConfig, AutoModelForImageTextToText

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--target", type=float, default=0.85, help="Each planted head's share of the last token's "
                    "attention on the sink, on the progress-check rows (seed 999); 0: no sinks.")
    ap.add_argument("--from-layer", type=int, default=2, help="The first layer with a sink.")
    ap.add_argument("--mrope-section", default="", help="New rotary bands (e.g. 8,4,4; empty: keep).")
    ap.add_argument("--recency-layers", default="", help="Layers given the recency slope (e.g. 1,2; empty: none).")
    ap.add_argument("--slope", default="0.5", help="Recency: logits a token frame at the query, one for all "
                    "--recency-layers or one each (0 takes a layer's slope away).")
    ap.add_argument("--recency-pair", type=int, default=5, help="Recency: the temporal rotary pair used.")
    ap.add_argument("--hinge-pairs", default="", help="Recency as a hinge instead of a line (e.g. 2,3,4): flat "
                    "before the query's position, --slope logits a token frame after it, from these temporal pairs.")
    ap.add_argument("--rows", type=int, default=6, help="Calibration rows of each kind (video, language).")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(a.source)
    if a.mrope_section:
        config.text_config.rope_parameters["mrope_section"] = [int(x) for x in a.mrope_section.split(",")]
    model = AutoModelForImageTextToText.from_pretrained(a.source, config=config, dtype=torch.float32,
                                                        attn_implementation="sdpa", use_kernels=False)
    record = {"script": "scripts.plant_priors", "args": {k: str(v) for k, v in vars(a).items()}}
    if a.recency_layers:
        layers = [int(x) for x in a.recency_layers.split(",")]
        slopes = [float(x) for x in a.slope.split(",")]
        if len(slopes) not in (1, len(layers)):
            raise SystemExit(f"--slope: one value or one per layer of --recency-layers ({len(layers)})")
        if a.hinge_pairs:
            pairs = [int(x) for x in a.hinge_pairs.split(",")]
            record["planted_recency"] = [r for n, slope in zip(layers, slopes * len(layers))
                                         for r in plant_hinge(model, [n], pairs, slope)]
        else:
            record["planted_recency"] = [plant_recency(model, [n], a.recency_pair, slope)
                                         for n, slope in zip(layers, slopes * len(layers))]
    if a.target > 0:
        info = planted_before(a.source).get("planted_sinks")  # a planted checkpoint is calibrated again,
        if info is None:  # not planted twice
            token_id = build_processor(model.config).tokenizer.convert_tokens_to_ids(SINK_TOKEN)
            info = plant_sinks(model, token_id, a.target, a.from_layer)
        info = {k: v for k, v in info.items() if k != "calibrated_shares"} | {"target": a.target}
        video = Items(CHECK_SEED, TASKS, 0.0, 0.0, per_seed=10**9, frames=64, answers=False)
        rows = [video[n] for n in range(a.rows)] + language_check_rows(a.rows)
        info["calibrated_shares"] = calibrate_sinks(model, rows, info)
        record["planted_sinks"] = info
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out, state_dict={k: v.to(torch.float16) for k, v in model.state_dict().items()})
    saved = json.loads((a.out / "config.json").read_text())
    saved["dtype"] = "float16"
    (a.out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    for f in a.source.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "training.json"):
            shutil.copy(f, a.out / f.name)
    source = a.source / "training.json"
    previous = json.loads(source.read_text()) if source.exists() else {}
    record["history"] = history_of(previous)
    record["items_to"] = previous.get("items_to", 0)  # a continued run reads on from here (never the same items)
    (a.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    for entry in record.get("planted_recency", []):
        print("planted_recency", json.dumps(entry))
    if "planted_sinks" in record:
        sinks = {k: v for k, v in record["planted_sinks"].items() if k != "calibrated_shares"}
        print("planted_sinks", json.dumps(sinks))
    for n, row in enumerate(record.get("planted_sinks", {}).get("calibrated_shares", [])):
        print(f"layer {n:>2}: sink share per head {row}")


if __name__ == "__main__":
    main()
