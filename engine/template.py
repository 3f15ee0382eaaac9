"""The Alpaca prompt template every source is rendered into.

All four public schemas (Dolly, Alpaca, oasst1, FLAN) are mapped onto one `Example`
(instruction, optional input, response) and rendered with the Alpaca template that Lit-GPT's
finetuning scripts use, so a model finetuned here is prompted exactly like one finetuned with
Lit-GPT, and `generate` / evaluation can wrap a bare question the same way.

`TEMPLATE_VERSION` is part of the tokenized-data cache key: bump it whenever the rendered
text changes, or stale caches would silently train on the old format.
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATE_VERSION = "alpaca-v1"

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Example:
    """One instruction-following example, whatever schema it came from."""

    instruction: str
    input: str
    """Extra context (Dolly's `context`, Alpaca's `input`); empty when there is none."""
    response: str


def format_prompt(example: Example) -> str:
    """The prompt the model sees before it must produce `example.response`.

    The no-input variant is used when `input` is empty, as Lit-GPT does, so examples without
    context do not carry an empty `### Input:` section.
    """
    if example.input:
        return PROMPT_WITH_INPUT.format(instruction=example.instruction, input=example.input)
    return PROMPT_NO_INPUT.format(instruction=example.instruction)
