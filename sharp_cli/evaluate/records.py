"""What one `sharp eval` cell asks and the results line it writes: shared by runner.py (one cell
at a time) and together.py (cells decoded together), which must write the same lines.

A cell is (method, ratio, seed); a line is one (item, cell) answer, or its error, with the run's
settings (runner.py's docstring says how lines are resumed and merged).
"""

from __future__ import annotations

import time
from dataclasses import replace

from sharp_cli.letters import build_prompt, parse_letter

UNPRUNED = ("none", 1.0, 0)  # the reference cell: its logits are what pruned answers agree with


def prompt_for(item) -> str:
    """The item's prompt (the benchmark's, set by prompts.apply), else the multiple-choice prompt, or
    the bare question for an item without options."""
    if getattr(item, "prompt", None):
        return item.prompt
    return build_prompt(item.question, item.options) if item.options else item.question


def cell_config(loaded, job, cell: tuple[str, float, int]):
    """The config one cell answers under: the run's options (job.base, a PruneConfig) with the
    cell's method, ratio and seed, K resolved for the model (once per cell, here; the phases
    assert on it)."""
    method, ratio, seed = cell
    return loaded.resolve_prune(replace(job.base, method=method, ratio=ratio, seed=seed))


def needle_tokens(loaded, item, clip, layout) -> list[int] | None:
    """The visual tokens the item's needle boxes overlap (needles.py), or None if not mappable.
    The boxes are in the file's pixels; frames decoded smaller (--max-pixels) are the same frame."""
    from sharp_cli import video
    from sharp_cli.evaluate import needles

    if not needles.mappable(loaded.processor):
        return None
    info = video.probe(item.video)
    size = (info.width, info.height) if info is not None else (clip.frames.shape[2], clip.frames.shape[1])
    return needles.token_numbers(item.needle_boxes, size, list(clip.indices), layout.grid, layout.frames_per_step)


def results_line(job, item, cell, answer=None, error: str | None = None, reference=None, needle=None,
                 retry: bool = False) -> dict:
    """The results line of one (item, cell): its answer (reference: the unpruned prefill logits
    of the same item, for the first-token agreement; needle: needle_tokens), or its error."""
    from sharp_cli.evaluate import agreement

    method, ratio, seed = cell
    labelled = bool(item.options) and item.answer is not None
    record = {"item": item.id, "method": method, "ratio": ratio, "seed": seed, "category": item.category,
              "answer": item.answer, "prediction": None, "correct": False if labelled else None, "output": None}
    if answer is not None:
        layout = answer.encoded.layout
        kept = answer.prefill.kept
        prediction = parse_letter(answer.text, item.options) if item.options else None
        record.update(prediction=prediction, correct=prediction == item.answer if labelled else None,
                      output=answer.text, first_token=int(answer.prefill.logits.reshape(-1).argmax()),
                      visual_tokens_total=int(layout.num_visual),
                      visual_tokens_kept=int(kept.numel()) if kept is not None else int(layout.num_visual),
                      prefill_seconds=answer.prefill.seconds, vision_seconds=answer.vision_seconds,
                      decode_seconds=answer.decode_seconds)
        record.update(selection(answer, method, needle))
        if method != "none" and reference is not None:
            record.update(agreement.first_token(reference, answer.prefill.logits))
    else:
        record["error"] = error
        if retry:  # not the video's fault: the next run answers it again
            record["retry"] = True
    record.update(rank=job.rank, time=round(time.time(), 3), settings=job.settings)
    return record


def selection(answer, method: str, needle) -> dict:
    """The tie audit and the needle tokens kept, read once the answer is done (nothing in flight):
    tie_share from the prune session's details (share of the kept tokens tied with the first dropped
    one; None where the selection does not report it), needle counts where the item has boxes."""
    session = answer.prefill.session
    share = (session.details or {}).get("tie_share") if session is not None else None
    out = {"tie_share": None if share is None else round(float(share), 6)}
    if needle is not None:
        kept = answer.prefill.kept
        if method == "none":
            hits = len(needle)  # nothing pruned
        else:
            hits = None if kept is None else len(set(needle) & set(kept.reshape(-1).tolist()))
        out.update(needle_tokens=len(needle), needle_kept=hits)
    return out
