"""Each benchmark's reference prompt, and the prompt a run uses (`--prompt`).

The reference prompts are lmms-eval's default prompts for the tasks users compare against (the task
yaml's `lmms_eval_specific_kwargs.default` plus its utils.py `doc_to_text`), written out here so that
sharp's unpruned row sits next to numbers published with lmms-eval:

  videomme        tasks/videomme/videomme.yaml + utils.py videomme_doc_to_text (no subtitles)
  mvbench         tasks/mvbench/mvbench_<task>.yaml + utils.py mvbench_doc_to_text
  mlvu            tasks/mlvu/mlvu_dev.yaml + utils.py mlvu_doc_to_text (the options as "(A) ..." lines of
                  the question, as in sy1998/MLVU_dev)
  longvideobench  tasks/longvideobench/longvideobench_val_v.yaml + utils.py longvideobench_doc_to_text
  sharp           letters.build_prompt: question, "A. option" lines, the instruction (our own format)

Option texts go in as the benchmark gives them (no whitespace folding) so the text is the same.
A question without options is asked as it is, whatever the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sharp_cli.letters import INSTRUCTION, LETTERS, PROMPT_VERSION, build_prompt

VIDEOMME_HEAD = ("Select the best answer to the following multiple-choice question based on the video and the "
                 "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")


def videomme(question: str, options: Sequence[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{VIDEOMME_HEAD}\n{question}\n{lines}\n\n{INSTRUCTION}"


def mvbench(question: str, options: Sequence[str]) -> str:
    lines = "".join(f"({LETTERS[i]}) {o}\n" for i, o in enumerate(options))
    return f"Question:{question}\nOption:\n{lines}Only give the best option.\n"


def mlvu(question: str, options: Sequence[str]) -> str:
    lines = "".join(f"({LETTERS[i]}) {o}\n" for i, o in enumerate(options))
    return f"{question}\n{lines}\nOnly give the best option.\nBest option: ("


def longvideobench(question: str, options: Sequence[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{lines}\n{INSTRUCTION}\n"


STYLES = {"sharp": build_prompt, "videomme": videomme, "mvbench": mvbench, "mlvu": mlvu,
          "longvideobench": longvideobench}
CHOICES = ("auto", *STYLES)


def check(style: str) -> None:
    from sharp_cli.errors import UsageError

    if style not in CHOICES:
        raise UsageError(f"--prompt must be one of {', '.join(CHOICES)}, got '{style}'")


def resolve(style: str, fmt: str) -> str:
    """`auto`: the benchmark's reference prompt (our own layout for our own format)."""
    check(style)
    return (fmt if fmt in STYLES else "sharp") if style == "auto" else style


def apply(dataset, style: str):
    """The dataset with every question that has options given its full prompt; returns (dataset, style)."""
    style = resolve(style, dataset.format)
    build = STYLES[style]
    items = [replace(item, prompt=build(item.question, item.options)) if item.options else item
             for item in dataset.items]
    return replace(dataset, items=items), style


def setting(style: str):
    """What the results file records: the sharp layout keeps the bare version number (files written before
    `--prompt` existed resume), the others name themselves, so no two prompts share a results file."""
    return PROMPT_VERSION if style == "sharp" else f"{style}/{PROMPT_VERSION}"
