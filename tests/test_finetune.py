"""Lesson 13's fine-tuning (nanopali/finetune.py): the data format and its errors, LoRA, the three recipes, the loop's
exactness (accumulation, checkpointing, the answer-only loss) and the command line, on the shipped small model."""

import json
import re

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import nanopali
from nanopali.finetune import (
    AnswerLoss,
    Example,
    FinetuneConfig,
    LoRALinear,
    add_lora,
    answer_loss,
    backward_in_pieces,
    batch_indices,
    check_config,
    choose_trainable,
    evaluate_examples,
    finetune,
    load_images,
    merge_lora,
    read_examples,
    with_gradient_checkpointing,
    without_gradient_checkpointing,
)
from nanopali.train import TASKS, evaluate, make_scene, make_task, suffix_loss

from conftest import SHIPPED, run_python

QUESTION = "answer en what color is the shape on the right?"


@pytest.fixture(scope="module")
def shipped():
    return nanopali.load(SHIPPED, dtype=torch.float32)


def fresh():
    return nanopali.load(SHIPPED, dtype=torch.float32)[0]


def write_data(folder, n=12, seed=0, name="data.jsonl"):
    "n scenes as PNG files, and a JSONL file asking the colour of the rightmost shape."
    records = []
    for i in range(n):
        image, objects = make_scene(np.random.default_rng([seed, i]))
        image.save(folder / f"{name}-{i}.png")
        records.append({"image": f"{name}-{i}.png", "prefix": QUESTION, "suffix": objects[-1].colour})
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / name


# ---------------------------------------------------------------- data


def test_examples_are_read_with_images_relative_to_the_file_or_absolute(tmp_path):
    path = write_data(tmp_path, 3)
    lines = path.read_text().splitlines()
    absolute = json.loads(lines[1]) | {"image": str(tmp_path / json.loads(lines[1])["image"])}
    path.write_text("\n".join([lines[0], "", json.dumps(absolute), lines[2]]) + "\n")  # a blank line is skipped
    examples = read_examples(path)
    assert [e.image for e in examples] == [tmp_path / f"data.jsonl-{i}.png" for i in range(3)]
    assert all(e.prefix == QUESTION for e in examples) and examples[0].suffix in {"red", "green", "blue", "yellow",
                                                                                   "purple", "orange"}


def test_every_bad_line_is_reported_with_its_number_before_any_use(tmp_path, shipped):
    _, processor = shipped
    write_data(tmp_path, 1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = {"image": "data.jsonl-0.png", "prefix": "caption en", "suffix": "a red circle"}
    lines = [json.dumps(good),
             json.dumps({"image": "data.jsonl-0.png", "prefix": "caption en"}),
             '{"image": "data.jsonl-0.png",',
             json.dumps(good | {"image": "nowhere.png"}),
             json.dumps(good | {"image": "broken.png"}),
             json.dumps(good | {"suffix": "  "}),
             json.dumps(good | {"prefix": "<image>caption en"}),
             json.dumps(good | {"suffix": "a cat<eos>"}),
             json.dumps(good | {"suffix": 3}),
             json.dumps(["data.jsonl-0.png", "caption en", "a cat"]),
             json.dumps(good | {"prefix": "caption en " + "word " * 600})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        read_examples(tmp_path / "bad.jsonl", processor, 512)
    message = str(e.value)
    assert "10 bad line(s)" in message and "line 1:" not in message
    expected = [(2, "missing 'suffix'"), (3, "not JSON"), (4, "image 'nowhere.png' not found"),
                (5, "image 'broken.png' cannot be read"), (6, "empty suffix"), (7, "the prefix contains <image>"),
                (8, "the suffix contains <eos>"), (9, "'suffix' must be a string, not 3"), (10, "a JSON list"),
                (11, "2473 tokens with the image's, more than the model's 512 positions")]
    for number, words in expected:
        assert f"line {number}: {words}" in message, (number, message)


def test_a_missing_or_empty_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_examples(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no examples"):
        read_examples(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------- LoRA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_starts_as_its_base_layer_and_merges_into_one_linear(dtype):
    torch.manual_seed(0)
    base = nn.Linear(24, 40).to(dtype)
    lora = LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(3, 7, 24, dtype=dtype)
    assert torch.equal(lora(x), base(x))
    assert lora.lora_A.dtype == lora.lora_B.dtype == torch.float32
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    with torch.no_grad():
        lora.lora_B.normal_(std=0.1)
    merged = lora.merged()
    assert type(merged) is nn.Linear and merged.weight.dtype == dtype
    expected = x.float() @ (base.weight.float() + 2.0 * lora.lora_B @ lora.lora_A).T + base.bias.float()
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged(x).float(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lora(x).float(), expected, atol=tolerance, rtol=tolerance)


def test_add_lora_wraps_gemmas_seven_linears_in_every_layer_and_merge_undoes_it(tmp_path):
    model = fresh()
    plain = set(model.state_dict())
    names = add_lora(model, rank=4)
    assert len(names) == 7 * model.config.text.num_hidden_layers
    assert all(n.startswith("language_model.model.layers.") for n in names)
    assert merge_lora(model) == len(names) and set(model.state_dict()) == plain
    nanopali.save(model, nanopali.load(SHIPPED)[1], tmp_path / "saved")  # a plain PaliGemma again: save takes it


def test_each_recipe_trains_what_it_names():
    def trained(train, freeze=False):
        model = fresh()
        return model, choose_trainable(model, train, freeze_vision=freeze)

    model, names = trained("lora")
    assert names and all(".lora_" in n for n in names) and all(n.startswith("language_model.") for n in names)
    model, names = trained("attention")
    everything = [n for n, _ in model.named_parameters()]
    assert names == [n for n in everything if n.startswith("language_model.") and ".self_attn." in n]
    model, names = trained("all")
    assert names == everything
    model, names = trained("all", freeze=True)
    assert names == [n for n in everything if not n.startswith("vision_tower.")]
    with pytest.raises(ValueError, match="choose one of lora, attention, all"):
        trained("everything")
    with pytest.raises(ValueError, match="freeze_vision goes with train='all'"):
        trained("lora", freeze=True)


def test_trained_weights_are_float32_and_the_model_comes_back_in_its_own_dtype(tmp_path):
    model, processor = nanopali.load(SHIPPED, dtype=torch.bfloat16)
    examples = read_examples(write_data(tmp_path, 4))
    finetune(model, processor, examples, FinetuneConfig(train="attention", steps=1, batch_size=2), progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


# ---------------------------------------------------------------- the loop


def test_answer_loss_equals_lesson_08s_suffix_loss(tmp_path, shipped):
    model, processor = shipped
    examples = read_examples(write_data(tmp_path, 5))
    examples[1] = Example(examples[1].image, "caption en", "a large red circle and a small blue star")
    batch = processor(load_images(examples), [e.prefix for e in examples], suffixes=[e.suffix for e in examples],
                      padding_side="right")
    full = suffix_loss(model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                             batch["token_type_ids"]), batch["labels"])
    torch.testing.assert_close(answer_loss(model, batch), full, atol=1e-6, rtol=1e-6)


def test_accumulation_and_checkpointing_change_no_gradient(tmp_path):
    model = fresh()
    processor = nanopali.load(SHIPPED)[1]
    choose_trainable(model, "all")
    examples = read_examples(write_data(tmp_path, 7))

    def gradients(pieces, checkpointing):
        model.zero_grad()
        if checkpointing:
            with_gradient_checkpointing(model)
        loss = backward_in_pieces(AnswerLoss(model), processor, examples, pieces, autocast=False)
        without_gradient_checkpointing(model)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, whole = gradients(1, False)
    for pieces, checkpointing in [(3, False), (7, False), (2, True)]:  # 7 in 3 pieces: 3, 3 and 1 examples
        other_loss, other = gradients(pieces, checkpointing)
        assert other_loss == pytest.approx(loss, rel=1e-5)
        for name in whole:
            torch.testing.assert_close(other[name], whole[name], rtol=1e-4, atol=1e-6)
    assert all("forward" not in layer.__dict__ for layer in model.language_model.model.layers)


def test_batches_go_through_each_epoch_once_in_a_new_order():
    stream = [i for step in range(15) for i in batch_indices(10, step, 4, seed=3)]  # 6 epochs of 10
    epochs = [stream[k:k + 10] for k in range(0, 60, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 6
    assert batch_indices(10, 7, 4, seed=3) == batch_indices(10, 7, 4, seed=3) != batch_indices(10, 7, 4, seed=4)


@pytest.mark.parametrize("train", ["lora", "attention", "all"])
def test_a_few_steps_lower_the_loss_and_leave_a_plain_model(tmp_path, train):
    model, processor = nanopali.load(SHIPPED, dtype=torch.float32)
    plain = set(model.state_dict())
    examples = read_examples(write_data(tmp_path, 8))
    cfg = FinetuneConfig(train=train, steps=12, batch_size=8, lr=2e-3 if train == "lora" else 5e-4, warmup=2,
                         gradient_checkpointing=train == "all", accumulate=2)
    losses = finetune(model, processor, examples, cfg, progress=False)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert set(model.state_dict()) == plain and not any(isinstance(m, LoRALinear) for m in model.modules())


def test_evaluation_scores_exact_answers_and_detection_boxes(tmp_path, shipped, monkeypatch):
    model, processor = shipped
    path = write_data(tmp_path, 2)
    examples = read_examples(path)
    box = "<loc0100><loc0100><loc0500><loc0500> star"
    examples = [Example(examples[0].image, "detect star", box), Example(examples[1].image, "caption en", "x")]
    answers = iter([[box.replace("0500>", "0520>"), "x "]])
    monkeypatch.setattr("nanopali.finetune.generate", lambda *a, **k: next(answers))
    assert evaluate_examples(model, processor, examples) == {"exact_match": 0.5, "detect": 1.0}


# ---------------------------------------------------------------- the command line


def test_the_command_line_fine_tunes_and_saves_a_folder_transformers_reads(tmp_path):
    train, val = write_data(tmp_path, 8, 0, "train.jsonl"), write_data(tmp_path, 6, 1, "val.jsonl")
    out = tmp_path / "model"
    run = run_python("-m", "nanopali.finetune", "--weights", str(SHIPPED), "--data", str(train), "--val", str(val),
                     "--out", str(out), "--steps", "3", "--batch-size", "4", "--accumulate", "2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert [line.split(":")[0] for line in run.stdout.splitlines()] == ["before", "after", "saved to " + str(out)]
    record = json.loads((out / "finetune.json").read_text())
    assert record["config"]["steps"] == 3 and record["config"]["accumulate"] == 2 and "exact_match" in record["after"]

    model, processor = nanopali.load(out, dtype=torch.float32)
    examples = read_examples(val)
    images, prompts = load_images(examples), [e.prefix for e in examples]
    ours = nanopali.generate(model, processor, images, prompts, max_new_tokens=6)
    reference = transformers.PaliGemmaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    inputs = processor(images, prompts)
    theirs = reference.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=1)
    assert ours == [processor.decode(row) for row in theirs[:, inputs["input_ids"].shape[1]:]]
    original = nanopali.load(SHIPPED, dtype=torch.float32)[0]
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


def test_bad_data_is_refused_with_line_numbers_before_the_model_loads(tmp_path):
    path = write_data(tmp_path, 2)
    path.write_text(path.read_text() + '{"image": "gone.png", "prefix": "caption en", "suffix": "a"}\n')
    run = run_python("-m", "nanopali.finetune", "--weights", str(SHIPPED), "--data", str(path),
                     "--out", str(tmp_path / "never"))
    assert run.returncode == 1 and not (tmp_path / "never").exists()
    assert run.stderr.startswith("nanopali.finetune: error: ") and "line 3: image 'gone.png' not found" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_out_folder_holding_files_is_refused_before_any_work(tmp_path):
    path = write_data(tmp_path, 2)
    run = run_python("-m", "nanopali.finetune", "--weights", str(SHIPPED), "--data", str(path), "--out",
                     str(SHIPPED))
    assert run.returncode == 1 and "already holds files" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("changes, words", [
    ({"steps": 0}, "--steps must be a whole number of at least 1"),
    ({"batch_size": 4, "accumulate": 5}, "--accumulate 5 is more pieces"),
    ({"lr": float("nan")}, "--lr must be a number above 0"),
    ({"rank": 0}, "--rank must be"),
    ({"train": "lora", "freeze_vision": True}, "--freeze-vision goes with --train all"),
    ({"final_lr_fraction": 2.0}, "--final-lr-fraction between 0 and 1"),
])
def test_each_impossible_setting_is_refused_naming_its_option(changes, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        check_config(FinetuneConfig(**changes))


# ---------------------------------------------------------------- lesson 13's claim, at the length the README gives


def write_new_question_data(folder, num_scenes, seed, old_share):
    "Lesson 13's data (13.5): the new question, and a replay of the old ones leaning on the colour question."
    records = []
    for i in range(num_scenes):
        rng = np.random.default_rng([seed, i])
        image, objects = make_scene(rng)
        image.save(folder / f"{seed}-{i}.png")
        if rng.random() < old_share:
            task = "colour" if rng.random() < 0.3 else str(rng.choice(TASKS))
            prefix, suffix = make_task(task, objects, rng, image.width)
        else:
            prefix, suffix = QUESTION, objects[-1].colour
        records.append({"image": f"{seed}-{i}.png", "prefix": prefix, "suffix": suffix})
    (folder / f"{seed}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / f"{seed}.jsonl"


def test_the_shipped_model_learns_a_new_question_and_keeps_its_old_ones(tmp_path, shipped):
    "README and lesson 13: 300 steps (under a minute here) take the new question from guessing to over 90%."
    train = write_new_question_data(tmp_path, 600, 1300, old_share=0.6)
    val = write_new_question_data(tmp_path, 100, 1301, old_share=0.0)
    run = run_python("-m", "nanopali.finetune", "--weights", str(SHIPPED), "--data", str(train), "--val", str(val),
                     "--out", str(tmp_path / "model"), "--steps", "300")
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "model" / "finetune.json").read_text())
    assert record["before"]["exact_match"] < 0.1 and record["after"]["exact_match"] >= 0.9, record
    before = evaluate(*shipped, num_scenes=100)
    after = evaluate(*nanopali.load(tmp_path / "model", dtype=torch.float32), num_scenes=100)
    assert sum(after.values()) >= 0.9 * sum(before.values()), (before, after)
    assert all(after[task] >= 0.85 * before[task] for task in before), (before, after)


def two_runs(tmp_path, *options):
    "The same 3 steps on one process and, under torchrun, on 2 CPU processes (gloo): both saved models' tensors."
    path = write_data(tmp_path, 16)
    common = ["-m", "nanopali.finetune", "--weights", str(SHIPPED), "--data", str(path), "--steps", "3",
              "--batch-size", "8", "--accumulate", "2", "--no-autocast", *options]
    one = run_python(*[o for o in common if o != "--fsdp"], "--out", str(tmp_path / "one"))
    two = run_python("-m", "torch.distributed.run", "--nproc_per_node=2", *common, "--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1500:], two.stderr[-1500:])
    assert two.stdout.count("saved to") == 1  # one process saves
    assert json.loads((tmp_path / "two" / "finetune.json").read_text())["processes"] == 2
    a, b = (nanopali.load(tmp_path / name, dtype=torch.float32)[0].state_dict() for name in ("one", "two"))
    start = nanopali.load(SHIPPED, dtype=torch.float32)[0].state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # the steps moved the weights
    return a, b


@pytest.mark.parametrize("options", [[], ["--fsdp", "--gradient-checkpointing"]], ids=["ddp", "fsdp"])
def test_two_processes_end_with_the_weights_of_one(tmp_path, options):
    "Each process takes half of every batch: the same weights as one process (float32), with DDP or FSDP."
    a, b = two_runs(tmp_path, *options)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_fsdp_training_everything_differs_only_where_adam_divides_noise_by_noise(tmp_path):
    """--train all: SigLIP's key biases have a zero gradient in exact arithmetic (softmax ignores a shift shared by a
    query's scores), so AdamW turns rounding noise into steps; everything else agrees."""
    a, b = two_runs(tmp_path, "--fsdp", "--train", "all", "--lr", "2e-4")
    assert max((a[k] - b[k]).abs().max().item() for k in a if not k.endswith("k_proj.bias")) < 1e-4


def test_fsdp_without_a_process_group_is_refused(tmp_path, shipped):
    model, processor = nanopali.load(SHIPPED, dtype=torch.float32)
    examples = read_examples(write_data(tmp_path, 2))
    with pytest.raises(ValueError, match="--fsdp shards the model between processes: run under torchrun"):
        finetune(model, processor, examples, FinetuneConfig(steps=1, batch_size=2, fsdp=True), progress=False)


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path, monkeypatch):
    model, processor = nanopali.load(SHIPPED, dtype=torch.float32)
    examples = read_examples(write_data(tmp_path, 4))
    monkeypatch.setattr("nanopali.finetune.process_group", lambda: (0, 3))
    with pytest.raises(ValueError, match=r"--batch-size 8 must split evenly into 3 process\(es\) x --accumulate 1"):
        finetune(model, processor, examples, FinetuneConfig(steps=1, batch_size=8), progress=False)


# ---------------------------------------------------------------- checkpoints


def test_an_interrupted_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    processor = nanopali.load(SHIPPED)[1]
    examples = read_examples(write_data(tmp_path, 8))
    cfg = FinetuneConfig(steps=6, batch_size=4, checkpoint_every=2, autocast=False)
    whole = fresh()
    whole_losses = finetune(whole, processor, examples, cfg, progress=False)

    checkpoint = tmp_path / "run.checkpoint.pt"
    calls = {"n": 0}
    real = nanopali.finetune.backward_in_pieces

    def stop_at_the_fifth_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("nanopali.finetune.backward_in_pieces", stop_at_the_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(fresh(), processor, examples, cfg, progress=False, checkpoint=checkpoint)
    assert torch.load(checkpoint, weights_only=False)["step"] == 4
    monkeypatch.setattr("nanopali.finetune.backward_in_pieces", real)

    resumed = fresh()
    losses = finetune(resumed, processor, examples, cfg, progress=False, checkpoint=checkpoint)
    assert losses == pytest.approx(whole_losses, rel=1e-5)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    other = FinetuneConfig(steps=6, batch_size=4, checkpoint_every=2, autocast=False, lr=1e-3)
    with pytest.raises(ValueError, match=r"other settings: --lr 0.001 \(the checkpoint's: 0.002\)"):
        finetune(fresh(), processor, examples, other, progress=False, checkpoint=checkpoint)


def test_the_command_line_deletes_its_checkpoint_once_the_model_is_saved(tmp_path):
    path = write_data(tmp_path, 4)
    out = tmp_path / "model"
    run = run_python("-m", "nanopali.finetune", "--weights", str(SHIPPED), "--data", str(path), "--out", str(out),
                     "--steps", "3", "--batch-size", "2", "--checkpoint-every", "1")
    assert run.returncode == 0, run.stderr[-1500:]
    assert (out / "model.safetensors").is_file() and not (tmp_path / "model.checkpoint.pt").exists()


def test_a_device_that_is_not_one_is_refused_in_one_line(tmp_path):
    path = write_data(tmp_path, 2)
    run = run_python("-m", "nanopali.finetune", "--weights", str(SHIPPED), "--data", str(path), "--out",
                     str(tmp_path / "never"), "--device", "nonsense")
    assert run.returncode == 1 and "is not a device name" in run.stderr and "Traceback" not in run.stderr
