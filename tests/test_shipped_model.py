"""The small PaliGemma shipped in weights/ (lesson 08): complete, read alike by nanopali and transformers, and its
recorded score is what it really scores."""

import json

import pytest
import torch
import transformers

import nanopali
from nanopali.segmentation import SceneSegmenter, load_mask_decoder
from nanopali.train import SEGMENT, TASKS, TrainConfig, evaluate, held_out_examples, score

from conftest import SHIPPED


@pytest.fixture(scope="module")
def shipped():
    return nanopali.load(SHIPPED, dtype="float32")


@pytest.fixture(scope="module")
def segmenter():
    "The shipped model was taught `segment` (lesson 12) with the VQ-VAE beside it."
    return SceneSegmenter(load_mask_decoder(SHIPPED))


def test_the_folder_is_complete_and_small():
    names = {f.name for f in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "eval.json",
            "train_log.jsonl", "vae-shapes.npz"} <= names
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 20 * 2**20


def test_transformers_gives_the_same_greedy_answers(shipped, segmenter):
    model, processor = shipped
    examples = held_out_examples(4, segmenter=segmenter)  # 28 questions: each task 4 times, segment included
    assert {e[0] for e in examples} == {*TASKS, SEGMENT}
    images, prompts = [e[1] for e in examples], [e[2] for e in examples]
    got = nanopali.generate(model, processor, images, prompts, max_new_tokens=56)

    reference = transformers.PaliGemmaForConditionalGeneration.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    inputs = processor(images, prompts)
    out = reference.generate(**inputs, max_new_tokens=56, do_sample=False, pad_token_id=0, eos_token_id=1)
    expected = [processor.decode(row) for row in out[:, inputs["input_ids"].shape[1]:]]
    assert got == expected
    right, asked = map(sum, zip(*(score(e[0], a, e[3], e[1].size[0], e[4], segmenter) for e, a in zip(examples, got))))
    assert right >= 0.7 * asked, f"the shipped model got only {right} of {asked} held-out answers right"


def test_the_recorded_score_is_the_real_one(shipped, segmenter):
    model, processor = shipped
    recorded = json.loads((SHIPPED / "eval.json").read_text())
    assert set(recorded) == {*TASKS, SEGMENT}
    assert evaluate(model, processor, 600, segmenter=segmenter) == pytest.approx(recorded, abs=1e-12)


def test_the_log_is_of_the_default_run():
    cfg = TrainConfig()
    records = [json.loads(line) for line in open(SHIPPED / "train_log.jsonl")]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and steps[-1] == cfg.pretrain_steps + cfg.steps
    assert [r["stage"] for r in records] == sorted((r["stage"] for r in records), key=["pretrain", "tasks"].index)
    evals = [r["step"] - cfg.pretrain_steps for r in records if "eval" in r]
    assert evals == [*range(cfg.eval_every, cfg.steps, cfg.eval_every), cfg.steps]  # and at the very end
