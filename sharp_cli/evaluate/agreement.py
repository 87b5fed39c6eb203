"""Agreement of a pruned model with the unpruned one: no labels needed.

Two measures per question, both against the same model without pruning (method `none`):

- answer agreement: the pruned answer is the unpruned one. With options, two answers agree when
  both parse to the same letter (so "B" and "B. red" agree); otherwise, or when either does not
  parse, when their texts are equal after folding case and whitespace.
- the first answer token's distribution: KL(unpruned || pruned) of the softmax over the whole
  vocabulary, in float64, and whether the two argmax tokens are the same (top-1 agreement).

They work on any data: a question without a gold answer (or without options) still counts.
`sharp eval` stores the two first-token figures in every pruned results line, so they survive
resuming; `sharp bench` can call `first_token` on the logits of its own runs.
"""

from __future__ import annotations

from sharp_cli.letters import parse_letter


def first_token(reference, logits) -> dict:
    """{"first_token_kl", "first_token_agree"} of (1, 1, vocab) or (vocab,) logits against the
    reference (unpruned) logits of the same prompt."""
    import torch

    ref = reference.detach().reshape(-1).to("cpu", torch.float64)
    got = logits.detach().reshape(-1).to("cpu", torch.float64)
    if ref.shape != got.shape:
        raise ValueError(f"logits of {got.numel()} tokens against a reference of {ref.numel()}")
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum())
    return {"first_token_kl": max(0.0, kl), "first_token_agree": bool(int(ref.argmax()) == int(got.argmax()))}


def _text(answer) -> str:
    return " ".join(str(answer or "").casefold().split())


def same_answer(reference: dict, record: dict, options=None) -> bool:
    """Whether two results lines (unpruned, pruned) give the same answer."""
    if options:
        a, b = reference.get("prediction"), record.get("prediction")
        if a is None:
            a = parse_letter(reference.get("output"), options)
        if b is None:
            b = parse_letter(record.get("output"), options)
        if a is not None and b is not None:
            return a == b
    return _text(reference.get("output")) == _text(record.get("output"))


def summarize(found: list[dict], references: dict, options_of: dict) -> dict:
    """Agreement figures of one (method, ratio) row: `found` its lines, `references` item id ->
    the `none` line, `options_of` item id -> options. Lines with an error on either side, or no
    reference, are left out (`agreement_questions` says how many count)."""
    pairs = [(references[r["item"]], r) for r in found
             if r["item"] in references and not r.get("error") and not references[r["item"]].get("error")]
    kls = [r["first_token_kl"] for _, r in pairs if r.get("first_token_kl") is not None]
    tops = [bool(r["first_token_agree"]) for _, r in pairs if r.get("first_token_agree") is not None]
    same = [same_answer(ref, r, options_of.get(r["item"])) for ref, r in pairs]
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"agreement_questions": len(pairs), "answer_agreement": mean(same),
            "first_token_agreement": mean(tops), "first_token_kl": mean(kls)}
