"""bfloat16 and batching, on the shipped model: the answers lessons 06, 07 and 09 give for the 96 held-out questions
lesson 08 scores (16 scenes x 6 tasks, greedy, up to 40 new tokens, as `evaluate` asks them).

In bfloat16 a question asked alone and the same question asked in a padded batch are not computed with the same
roundings (the padding keys shift the sums inside attention, and a batch of 8 multiplies its matrices by other
kernels than a batch of 1), so a near tie between two tokens can go either way. The reference implementation has
the same effect; ours must be no larger on the same batches. And the command line's path, which also keeps the
attention, must give exactly the answer of `generate` for the same question."""

import pytest
import torch

import nanopali
from nanopali.paligemma import generate
from nanopali.train import held_out_examples
from nanopali.visualize import generate_with_attention

from conftest import SHIPPED

transformers = pytest.importorskip("transformers")

MAX_NEW_TOKENS, BATCH = 40, 8


@pytest.fixture(scope="module")
def bf16():
    "The shipped model in bfloat16 (the default for real checkpoints), the 96 questions, and its answers alone."
    model, processor = nanopali.load(SHIPPED, dtype="bfloat16")
    examples = held_out_examples(16, processor.image_size[0])
    alone = [generate(model, processor, [image], [prompt], max_new_tokens=MAX_NEW_TOKENS)[0]
             for _, image, prompt, *_ in examples]
    return model, processor, examples, alone


LONG = "answer en " + " ".join(["what color is the shape left of the big one?"] * 2)  # 106 tokens, image included


def batches(examples):
    """The questions 7 at a time, in order, each batch completed by a longer question (about the first scene), to
    which the others are padded on the left: 30 to 38 padding tokens, in a batch of 8."""
    for start in range(0, len(examples), BATCH - 1):
        chunk = examples[start:start + BATCH - 1]
        yield start, [e[1] for e in chunk] + [examples[0][1]], [e[2] for e in chunk] + [LONG]


def reference_answers(reference, processor, images, prompts):
    "transformers' greedy answers for the very inputs our processor makes."
    inputs = processor(images, prompts, padding_side="left")
    with torch.inference_mode():
        out = reference.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 pixel_values=inputs["pixel_values"].to(torch.bfloat16),
                                 token_type_ids=inputs["token_type_ids"], max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False)
    return [processor.decode(row) for row in out[:, inputs["input_ids"].shape[1]:]]


def test_the_held_out_questions_are_16_scenes_of_6_tasks(bf16):
    _, _, examples, alone = bf16
    assert len(examples) == len(alone) == 96


def test_batching_changes_no_more_answers_than_in_the_reference(bf16):
    model, processor, examples, alone = bf16
    reference = transformers.PaliGemmaForConditionalGeneration.from_pretrained(SHIPPED, dtype=torch.bfloat16).eval()
    ours_changed = theirs_changed = 0
    for start, images, prompts in batches(examples):
        batched = generate(model, processor, images, prompts, max_new_tokens=MAX_NEW_TOKENS)
        ours_changed += sum(a != b for a, b in zip(alone[start:], batched[:-1]))
        theirs_alone = [reference_answers(reference, processor, [i], [p])[0] for i, p in zip(images, prompts)][:-1]
        theirs_batched = reference_answers(reference, processor, images, prompts)[:-1]
        theirs_changed += sum(a != b for a, b in zip(theirs_alone, theirs_batched))
    assert ours_changed <= theirs_changed, f"batching changed {ours_changed} of our answers, {theirs_changed} of theirs"


def test_the_command_line_path_answers_as_generate(bf16):
    "generate_with_attention (python -m nanopali) keeps the weights of every step; it must not change the answer."
    model, processor, examples, alone = bf16
    kept = [generate_with_attention(model, processor, image, prompt, max_new_tokens=MAX_NEW_TOKENS).text
            for _, image, prompt, *_ in examples]
    differ = [i for i, (a, b) in enumerate(zip(alone, kept)) if a != b]
    assert not differ, f"questions {differ} answered differently"
