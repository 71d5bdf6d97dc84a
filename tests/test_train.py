"""Lesson 08: the scenes, the tasks, the loss on the answer only, and the trainer's guarantees."""

import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import nanopali.train as trainer
from nanopali.bridge import PaliGemmaProcessor
from nanopali.train import (
    COLOURS,
    SHAPES,
    SIZES,
    TASKS,
    TrainConfig,
    caption,
    iou,
    loc_tokens,
    main,
    make_scene,
    make_task,
    parse_detections,
    patch_targets,
    probe_loss,
    save_checkpoint,
    suffix_loss,
    train,
)

from conftest import IMAGES, REPO, SHIPPED, run_python


@pytest.fixture(autouse=True)
def tokenizer_once(monkeypatch):
    "Every run here learns the same tokenizer from its seed: learn it once per seed (seconds each time otherwise)."
    monkeypatch.setattr(trainer, "make_tokenizer", _tokenizer_of_seed)


@functools.cache
def _tokenizer_of_seed(seed: int = 0):
    return _make_tokenizer(seed)


_make_tokenizer = trainer.make_tokenizer


def test_scenes_are_deterministic():
    a, objects_a = make_scene(np.random.default_rng(42))
    b, objects_b = make_scene(np.random.default_rng(42))
    assert a.tobytes() == b.tobytes() and objects_a == objects_b
    c, _ = make_scene(np.random.default_rng(43))
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("seed", range(25))
def test_boxes_hold_exactly_their_masks_and_the_masks_their_colour(seed):
    side = (112, 84, 224, 150, 97)[seed % 5]
    image, objects, masks = make_scene(np.random.default_rng(seed), side, with_masks=True)
    pixels = np.asarray(image).astype(float)
    assert image.size == (side, side) and 1 <= len(objects) <= 3
    assert len({o.shape for o in objects}) == len({o.colour for o in objects}) == len(objects)
    for o, mask in zip(objects, masks):
        assert mask.shape == (side, side) and set(np.unique(mask)) == {0, 255}
        ys, xs = np.nonzero(mask)
        assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == o.box  # the tight box of the mask
        low, high = SIZES[o.size]
        assert max(o.box[2] - o.box[0], o.box[3] - o.box[1]) <= high * side + 1  # its size band (a star's box is
        assert max(o.box[2] - o.box[0], o.box[3] - o.box[1]) >= 0.9 * low * side - 1  # a little under its side)
        inside = pixels[mask > 0].mean(0)  # jitter up to 15, noise, soft edges: near the named colour, on average
        assert np.abs(inside - np.array(COLOURS[o.colour])).max() < 45, (o, inside)  # edges lean to the background
    background = pixels[np.all([m == 0 for m in masks], axis=0)].mean(0)
    assert background.min() > 195  # light grey, tinted


def test_shapes_have_soft_edges_and_scenes_many_sizes():
    for shape in SHAPES[:1] + SHAPES[2:]:  # a square fills whole pixels; the others cut some
        alpha = trainer.coverage(shape, 20)
        assert alpha.shape == (20, 20) and alpha.min() == 0 and alpha.max() == 1
        assert ((alpha > 0) & (alpha < 1)).sum() > 10, shape
    assert trainer.coverage("square", 9).min() == 1
    sides = [trainer.draw_size(np.random.default_rng([i, 3])) for i in range(400)]
    assert 0.4 < sides.count(112) / 400 < 0.6 and min(sides) >= 84 and max(sides) <= 224
    assert len(set(sides)) > 60
    examples = trainer.held_out_examples(20)  # the held-out scenes come in many sizes too, scored in their own
    assert len({e[1].size for e in examples}) > 3


def test_objects_do_not_overlap_and_come_left_to_right():
    for seed in range(50):
        _, objects = make_scene(np.random.default_rng(seed))
        centres = [(o.box[1] + o.box[3]) / 2 for o in objects]
        assert centres == sorted(centres)
        assert all(b - a >= 7 for a, b in zip(centres, centres[1:]))  # never ambiguous (112 / 14 px, less rounding)
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                assert iou(a.box, b.box) == 0


def test_answers_agree_with_the_scene():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        _, objects = make_scene(rng)
        by_shape = {o.shape: o for o in objects}
        prefix, suffix = make_task("colour", objects, rng, 112)
        assert by_shape[prefix.split()[-1].rstrip("?")].colour == suffix
        prefix, suffix = make_task("shape", objects, rng, 112)
        assert {o.colour: o.shape for o in objects}[prefix.split()[-2]] == suffix
        assert make_task("count", objects, rng, 112)[1] == str(len(objects))
        prefix, suffix = make_task("exists", objects, rng, 112)
        assert suffix == ("yes" if prefix.split()[-1].rstrip("?") in by_shape else "no")
        prefix, suffix = make_task("detect", objects, rng, 112)
        found = parse_detections(suffix, 112)
        assert [name for name, _ in found] == prefix[len("detect "):].split(" ; ")
        for name, box in found:
            assert iou(box, by_shape[name].box) > 0.95  # 1023 bins: rounding only
        assert make_task("caption", objects, rng, 112)[1] == caption(objects)


def test_caption_and_location_formats():
    from types import SimpleNamespace as Named  # a stand-in with just what caption reads

    assert caption([Named(name="large red circle")]) == "a large red circle"
    assert caption([Named(name="large red circle"), Named(name="small blue square")]) == \
        "a large red circle and a small blue square"
    assert caption([Named(name="x"), Named(name="y"), Named(name="z")]) == "a x, a y and a z"
    assert loc_tokens((0, 56, 112, 28), 112) == "<loc0000><loc0512><loc1023><loc0256>"
    with pytest.raises(ValueError, match="unknown task"):
        make_task("paint", [], np.random.default_rng(0), 112)
    _, objects, masks = make_scene(np.random.default_rng(0), with_masks=True)
    with pytest.raises(ValueError, match="the segment task needs the scene's masks"):
        make_task("segment", objects, np.random.default_rng(0), 112, masks)  # no segmenter: lesson 12 brings it


def test_the_segment_hook(monkeypatch):
    "make_task, make_batch and evaluate hand segment to the segmenter they are given, and only then ask it."
    class Writer:  # a stand-in segmenter: its answer names the objects and the size it was told
        def answer(self, objects, masks, image_size):
            assert all(m.shape == (image_size, image_size) for m in masks)
            return " ; ".join(f"{loc_tokens(o.box, image_size)} {o.shape} {image_size}" for o in objects)

        def score(self, answer, suffix, masks, image_size):
            return (0.5, 1) if answer == "seen" else (0.0, 1)

    _, objects, masks = make_scene(np.random.default_rng(5), 150, with_masks=True)
    prefix, suffix = make_task("segment", objects, np.random.default_rng(1), 150, masks, Writer())
    assert prefix.startswith("segment ") and [p.split()[-2] for p in suffix.split(" ; ")] == prefix[8:].split(" ; ")
    assert trainer.task_weights() == trainer.TASK_WEIGHTS
    weights = trainer.task_weights(0.25)
    assert weights["segment"] == 0.25 and abs(sum(weights.values()) - 1) < 1e-9
    assert weights["caption"] == pytest.approx(0.75 * trainer.TASK_WEIGHTS["caption"])
    examples = trainer.held_out_examples(3, segmenter=Writer())
    assert [e[0] for e in examples[:7]] == [*TASKS, "segment"]
    for task, image, prefix, suffix, masks_by_shape in examples:  # each scene's masks, by shape, at its own size
        assert all(m.shape == (image.height, image.width) for m in masks_by_shape.values())
        if task == "segment":
            assert set(prefix[len("segment "):].split(" ; ")) <= set(masks_by_shape)
            assert suffix.split(" ; ")[0].endswith(f" {image.width}")  # the segmenter was told the image's own size
    assert len(trainer.held_out_examples(3)) == 18  # without a segmenter: the six tasks

    processor = PaliGemmaProcessor(trainer.make_tokenizer(0), 64, (112, 112))
    plain = trainer.make_batch(processor, 0, 3, 16, 112)
    assert torch.equal(trainer.make_batch(processor, 0, 3, 16, 112, Writer(), 0.0)["input_ids"], plain["input_ids"])
    mixed = trainer.make_batch(processor, 0, 3, 16, 112, Writer(), 0.5)
    asked = [processor.decode(row) for row in mixed["input_ids"]]
    segmented = sum("segment" in text.replace(" ", "") for text in asked)
    assert 3 <= segmented <= 13  # about half, answered by the Writer, which ends each part with the drawn side
    assert sum(bool(re.search(r"\b\d{2,3}\b", text)) for text in asked) == segmented

    def answers(model, processor, images, prompts, max_new_tokens):  # a stand-in model: "seen" to segment only
        assert max_new_tokens == 56  # two segments are 43 tokens
        return ["seen" if p.startswith("segment") else "" for p in prompts]

    monkeypatch.setattr(trainer, "generate", answers)
    model = SimpleNamespace(training=False, train=lambda mode=True: None, eval=lambda: None)
    assert trainer.evaluate(model, processor, 5, segmenter=Writer()) == {**{t: 0.0 for t in TASKS}, "segment": 0.5}


def test_loss_counts_only_answer_tokens():
    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, -100, 7, 8, 1, -100], [-100, -100, 5, 1, -100, -100, -100]])
    logits = torch.randn(2, 7, 10)
    base = suffix_loss(logits, labels)
    changed = logits.clone()
    changed[0, [0, 1, 5, 6]] += 5 * torch.randn(4, 10)  # positions whose *next* label is -100, or the last
    changed[1, [0, 3, 4, 5, 6]] += 5 * torch.randn(5, 10)
    assert torch.equal(suffix_loss(changed, labels), base)
    changed[0, 2, 7] += 5.0  # position 2 predicts label 7: now the loss moves
    assert not torch.equal(suffix_loss(changed, labels), base)


def test_loss_averages_per_sequence():
    "A one-token answer weighs as much as a long one."
    logits = torch.zeros(2, 6, 4)
    logits[0, 0, 2] = 10.0  # sequence 0 predicts its single answer token well
    labels = torch.tensor([[-100, 2, -100, -100, -100, -100], [-100, 1, 1, 1, 1, 1]])
    per_sequence_1 = torch.nn.functional.cross_entropy(torch.zeros(1, 4), torch.tensor([1]))
    expected = (torch.nn.functional.cross_entropy(logits[0, :1], torch.tensor([2])) + per_sequence_1) / 2
    torch.testing.assert_close(suffix_loss(logits, labels), expected)


def tiny_run(folder, steps, **changes):
    settings = dict(out=str(folder / "model"), pretrain_steps=0, pretrain_batch_size=4, steps=steps, batch_size=4,
                    warmup=5, eval_every=10_000, eval_scenes=2, checkpoint_every=5, log_every=5)
    return TrainConfig(**{**settings, **changes})


def interrupt_after(steps, cfg, monkeypatch):
    "Run cfg and stop it as Ctrl-C would, when the step after `steps` asks for its batch."
    import nanopali.train as t

    calls = {"n": 0}

    def stopping(original):
        def stop(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > steps:
                raise KeyboardInterrupt
            return original(*args, **kwargs)
        return stop

    with monkeypatch.context() as patch:
        patch.setattr(t, "make_batch", stopping(t.make_batch))
        patch.setattr(t, "make_pretrain_batch", stopping(t.make_pretrain_batch))
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)


def test_a_few_steps_lower_the_loss(tmp_path):
    cfg = tiny_run(tmp_path, 40, batch_size=8, lr=2e-3)
    train(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "model.log.jsonl")]
    assert losses[-1] < 0.6 * losses[0]


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Stop a run after 5 of its 3 + 7 steps (as Ctrl-C would: in its second stage, the tower still frozen), start it
    again: same weights as never stopping, the thaw included."""
    whole, _ = train(tiny_run(tmp_path / "a", 7, pretrain_steps=3, freeze_vision_steps=3), progress=False)
    partial = tiny_run(tmp_path / "b", 7, pretrain_steps=3, freeze_vision_steps=3)
    interrupt_after(5, partial, monkeypatch)
    assert torch.load(tmp_path / "b" / "model.checkpoint.pt", weights_only=False)["step"] == 5
    resumed, _ = train(partial, progress=False)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    records = [json.loads(line) for line in open(tmp_path / "b" / "model.log.jsonl")]
    assert [(r["step"], r["stage"]) for r in records] == [(3, "pretrain"), (5, "tasks"), (10, "tasks")]


def test_resuming_drops_log_lines_after_the_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_run(tmp_path, 8, checkpoint_every=3, log_every=1, eval_every=4, eval_scenes=1)
    interrupt_after(5, cfg, monkeypatch)
    train(cfg, progress=False)
    records = [json.loads(line) for line in open(tmp_path / "model.log.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["step"] for r in records if "eval" in r] == [4, 8]  # evaluation does not depend on logging
    assert records[0]["lr_text"] == pytest.approx(cfg.lr / cfg.warmup)  # the rate used at step 1


def test_scene_with_too_many_objects_is_refused():
    with pytest.raises(ValueError, match="max_objects must be between 1 and 4"):
        make_scene(np.random.default_rng(0), max_objects=5)


def test_an_interrupted_save_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "run.checkpoint.pt"
    save_checkpoint(path, step=1, model={"w": torch.ones(3)})

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as half:
            half.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, step=2, model={"w": torch.zeros(3)})
    monkeypatch.undo()
    state = torch.load(path, weights_only=False)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert not (tmp_path / "run.checkpoint.pt.tmp").exists()


def test_a_checkpoint_of_other_settings_is_refused_naming_each_one(tmp_path, monkeypatch, float32_steps):
    train(tiny_run(tmp_path, 5, batch_size=2, eval_scenes=1), progress=False)
    before = digest(tmp_path)
    monkeypatch.setattr(trainer, "build", no_work)
    with pytest.raises(ValueError) as refused:
        train(tiny_run(tmp_path, 5, batch_size=2, eval_scenes=1, lr=5e-4, seed=1), progress=False)
    message = str(refused.value)
    assert message == (f"{tmp_path / 'model.checkpoint.pt'} was written with other settings: --seed 1 (the "
                       "checkpoint's: 0), --lr 0.0005 (the checkpoint's: 0.001). Resume with the checkpoint's values, "
                       "or start over with --no-resume")
    with pytest.raises(ValueError, match=r"--steps 3 \(the checkpoint's: 5; it may grow, not shrink\)"):
        train(tiny_run(tmp_path, 3, batch_size=2, eval_scenes=1), progress=False)
    assert digest(tmp_path) == before  # nothing changed on disk


def test_stage_1_starts_with_the_vision_tower_frozen(tmp_path, monkeypatch):
    "For freeze_vision_steps steps of stage 1 the tower does not move (the projector does); then it thaws, slower."
    cfg = tiny_run(tmp_path, 6, pretrain_steps=2, freeze_vision_steps=3, warmup=1, log_every=1)
    seen = []
    original = trainer.training_step

    def watching(model, probe, processor, cfg, step, *args, **kwargs):
        seen.append((step, {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision_tower",
                                                                                                "multi_modal"))}))
        return original(model, probe, processor, cfg, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", watching)
    model, _ = train(cfg, progress=False)
    seen.append((8, {k: v for k, v in model.state_dict().items() if k.startswith(("vision_tower", "multi_modal"))}))
    moved = [(a, {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])})
             for (a, before), (_, after) in zip(seen, seen[1:])]
    assert moved == [(0, {"vision_tower", "multi_modal_projector"}), (1, {"vision_tower", "multi_modal_projector"}),
                     (2, {"multi_modal_projector"}), (3, {"multi_modal_projector"}), (4, {"multi_modal_projector"}),
                     (5, {"vision_tower", "multi_modal_projector"}), (6, {"vision_tower", "multi_modal_projector"}),
                     (7, {"vision_tower", "multi_modal_projector"})]
    records = [json.loads(line) for line in open(tmp_path / "model.log.jsonl")]
    factor = [trainer.learning_rate_factor(s, 6, 1, cfg.final_lr_fraction) for s in range(6)]
    assert [r["lr_vision"] for r in records[2:]] == pytest.approx(
        [f * (cfg.vision_lr if s < 3 else cfg.thawed_vision_lr) for s, f in enumerate(factor)])
    assert [r["lr_text"] for r in records[2:]] == pytest.approx([f * cfg.lr for f in factor])
    with pytest.raises(ValueError, match=r"--freeze-vision-steps -1: must be a whole number >= 0"):
        trainer.check_config(dataclasses.replace(cfg, freeze_vision_steps=-1))
    with pytest.raises(ValueError, match=r"--thawed-vision-lr 0: must be a number > 0"):
        trainer.check_config(dataclasses.replace(cfg, thawed_vision_lr=0))


def test_a_checkpoint_from_before_the_segment_task_resumes(tmp_path, float32_steps):
    "Checkpoints written before TrainConfig had segment_share trained without it, and resume as if it were 0."
    cfg = tiny_run(tmp_path, 5, batch_size=2, eval_scenes=1)
    train(cfg, progress=False)
    path = tmp_path / "model.checkpoint.pt"
    state = torch.load(path, weights_only=False)
    del state["config"]["segment_share"]
    torch.save(state, path)
    assert trainer.read_checkpoint(path, cfg)["step"] == 5
    for name in ("freeze_vision_steps", "thawed_vision_lr"):  # older still: no frozen start, which is freezing 0
        del state["config"][name]
    torch.save(state, path)
    assert trainer.read_checkpoint(path, dataclasses.replace(cfg, freeze_vision_steps=0))["step"] == 5
    with pytest.raises(ValueError, match=r"--freeze-vision-steps 2500 \(the checkpoint's: 0\)"):
        trainer.read_checkpoint(path, cfg)
    with pytest.raises(ValueError, match=r"--segment-share 0.25 \(the checkpoint's: 0.0\)"):
        trainer.read_checkpoint(path, dataclasses.replace(cfg, segment_share=0.25))


def test_the_segment_task_without_a_segmenter_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "build", no_work)
    with pytest.raises(ValueError, match="--segment-share 0.25 needs a segmenter: lesson 12's SceneSegmenter"):
        train(tiny_run(tmp_path, 5, segment_share=0.25), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_trains_evaluates_and_saves(tmp_path):
    out = tmp_path / "shapes"
    result = run_python("-m", "nanopali.train", "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out accuracy on 3 scenes" in result.stdout
    scores = json.loads((out / "eval.json").read_text())
    assert set(scores) == set(TASKS)
    assert (out / "train_log.jsonl").read_text() == (tmp_path / "shapes.log.jsonl").read_text()
    import nanopali
    model, processor = nanopali.load(out)
    assert len(nanopali.generate(model, processor, [IMAGES / "chelsea.png"], ["caption en"], max_new_tokens=3)) == 1

    again = run_python("-m", "nanopali.train", "--out", str(out), *TINY)  # the same command: the run is finished
    assert again.returncode == 1
    assert one_line(again.stderr) == (f"nanopali.train: error: --out {out} already holds a model: add --overwrite to "
                                      "replace it with the new model, or choose another --out")
    longer = run_python("-m", "nanopali.train", "--out", str(out), *TINY, "--steps", "8", "--overwrite")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "extending stage 1 from 6 to 8 steps" in longer.stdout
    steps = [json.loads(line)["step"] for line in open(out / "train_log.jsonl")]
    assert steps[-1] == 10 and steps == sorted(steps)


# Nothing the user owns is overwritten, and every mistake gets one line (issue 15).

TINY = ["--pretrain-steps", "2", "--pretrain-batch-size", "4", "--steps", "6", "--batch-size", "4", "--warmup", "2",
        "--eval-scenes", "2", "--eval-every", "1000", "--checkpoint-every", "3", "--final-eval-scenes", "3"]


def digest(folder) -> dict:
    "Every file under folder, with the hash of its bytes."
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def no_work(*args, **kwargs):
    raise AssertionError("the run did work before refusing")


@pytest.fixture
def float32_steps(monkeypatch):
    """Train in float32 in the tests of the bookkeeping, which do not depend on the precision: bfloat16 autocast is
    emulated, and several times slower, on CPUs without bfloat16 instructions."""
    step = trainer.training_step
    monkeypatch.setattr(trainer, "training_step", lambda *args, **kwargs: step(*args, **kwargs, autocast=False))


def test_without_out_the_run_is_refused_and_the_shipped_model_is_untouched():
    before, beside = digest(SHIPPED), sorted(p.name for p in SHIPPED.parent.iterdir())
    result = run_python("-m", "nanopali.train", "--pretrain-steps", "0", "--steps", "2", "--batch-size", "2")
    assert result.returncode == 2
    assert one_line(result.stderr) == ("nanopali.train: error: the following arguments are required: --out (see "
                                       "python -m nanopali.train --help)")
    assert digest(SHIPPED) == before and sorted(p.name for p in SHIPPED.parent.iterdir()) == beside
    assert TrainConfig().out is None  # the recipe's defaults can be read; a run needs an out
    with pytest.raises(ValueError, match=r"no output folder: give --out FOLDER \(TrainConfig\(out=\.\.\.\)\)"):
        train(TrainConfig(pretrain_steps=0, steps=1), progress=False)


def test_the_shipped_folder_is_refused_without_overwrite():
    before, beside = digest(SHIPPED), sorted(p.name for p in SHIPPED.parent.iterdir())
    result = run_python("-m", "nanopali.train", "--out", "weights/nanopali-shapes", "--steps", "2")
    assert result.returncode == 1
    assert one_line(result.stderr) == ("nanopali.train: error: --out weights/nanopali-shapes already holds a model: "
                                       "add --overwrite to replace it with the new model, or choose another --out")
    assert digest(SHIPPED) == before and sorted(p.name for p in SHIPPED.parent.iterdir()) == beside


def test_a_folder_holding_files_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = digest(tmp_path)
    monkeypatch.setattr(trainer, "build", no_work)
    assert main(["--out", str(out), "--steps", "2"]) == 1
    assert one_line(capsys.readouterr().err) == (f"nanopali.train: error: --out {out} already holds files: add "
                                                 "--overwrite to replace it with the new model, or choose another "
                                                 "--out")
    assert digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overwrite_never_replaces_a_folder_of_models_or_the_current_folder(tmp_path, monkeypatch, capsys):
    "--out weights --overwrite (a slip for weights/mine) would delete every model: refused before any work."
    weights = tmp_path / "weights"
    (weights / "shipped").mkdir(parents=True)
    (weights / "shipped" / "config.json").write_text("{}")
    (weights / "README.md").write_text("mine")
    before = digest(tmp_path)
    monkeypatch.setattr(trainer, "build", no_work)
    monkeypatch.chdir(tmp_path)
    for out, says in [(str(weights), "is not a model's folder (it holds folders (shipped)): --overwrite replaces "
                                     "only a model's own folder"),
                      (".", "give the model's own folder by its name"),
                      ("..", "give the model's own folder by its name")]:
        assert main(["--out", out, "--steps", "2", "--overwrite"]) == 1
        line = one_line(capsys.readouterr().err)
        assert line.startswith("nanopali.train: error: --out") and says in line, line
    assert digest(tmp_path) == before
    assert sorted(p.name for p in weights.iterdir()) == ["README.md", "shipped"]


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "build", no_work)
    (tmp_path / "a-file").write_text("mine")
    assert main(["--out", str(tmp_path / "a-file")]) == 1
    assert one_line(capsys.readouterr().err) == (f"nanopali.train: error: --out {tmp_path / 'a-file'} is a file: give "
                                                 "the path of a folder for the model")
    assert main(["--out", str(tmp_path / "a-file" / "model")]) == 1
    assert one_line(capsys.readouterr().err) == (f"nanopali.train: error: --out {tmp_path / 'a-file' / 'model'}: "
                                                 f"{tmp_path / 'a-file'} is a file, not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: stand in for a user who cannot
            monkeypatch.setattr(trainer.os, "access", lambda path, mode: os.fspath(path) != os.fspath(locked))
        assert main(["--out", str(locked / "runs" / "model")]) == 1
    finally:
        locked.chmod(0o755)
    assert one_line(capsys.readouterr().err) == (f"nanopali.train: error: --out {locked / 'runs' / 'model'}: cannot "
                                                 f"write in {locked} (permission denied): choose a folder you can "
                                                 "write to")
    assert list(locked.iterdir()) == [] and (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize("flag, value, allowed", [
    ("--checkpoint-every", "0", "must be a whole number >= 1"),
    ("--log-every", "0", "must be a whole number >= 1"),
    ("--eval-every", "0", "must be a whole number >= 1"),
    ("--batch-size", "0", "must be a whole number >= 1"),
    ("--pretrain-batch-size", "0", "must be a whole number >= 1"),
    ("--image-size", "100", "must be a multiple of the patch size 14 from 28 to 294"),
    ("--image-size", "14", "must be a multiple of the patch size 14 from 28 to 294"),
    ("--image-size", "308", "must be a multiple of the patch size 14 from 28 to 294"),
    ("--lr", "nan", "must be a number > 0 (not nan or inf)"),
    ("--lr", "inf", "must be a number > 0 (not nan or inf)"),
    ("--lr", "0", "must be a number > 0 (not nan or inf)"),
    ("--vision-lr", "-0.001", "must be a number > 0 (not nan or inf)"),
    ("--pretrain-lr", "nan", "must be a number > 0 (not nan or inf)"),
    ("--clip", "0", "must be a number > 0 (not nan or inf)"),
    ("--weight-decay", "nan", "must be a number >= 0 (not nan or inf)"),
    ("--final-lr-fraction", "2", "must be between 0 and 1"),
    ("--segment-share", "1", "must be at least 0 and below 1 (0: no segment task)"),
    ("--segment-share", "-0.25", "must be at least 0 and below 1 (0: no segment task)"),
    ("--steps", "-5", "must be a whole number >= 0"),
    ("--pretrain-steps", "-1", "must be a whole number >= 0"),
    ("--warmup", "-1", "must be a whole number >= 0"),
    ("--seed", "-1", "must be a whole number >= 0"),
    ("--eval-scenes", "0", "must be a whole number >= 1"),
    ("--final-eval-scenes", "0", "must be a whole number >= 1"),
    ("--threads", "0", "must be a whole number >= 1 (leave it out for PyTorch's choice)"),
])
def test_each_impossible_setting_gets_one_line_before_any_work(tmp_path, monkeypatch, capsys, flag, value, allowed):
    monkeypatch.setattr(trainer, "build", no_work)
    assert main(["--out", str(tmp_path / "model"), flag, value]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"nanopali.train: error: {flag} ") and line.endswith(f": {allowed}"), line
    assert list(tmp_path.iterdir()) == []


def test_a_bad_setting_is_refused_by_the_command_line_in_one_line(tmp_path):
    result = run_python("-m", "nanopali.train", "--out", str(tmp_path / "model"), "--batch-size", "0")
    assert (result.returncode, one_line(result.stderr)) == (
        1, "nanopali.train: error: --batch-size 0: must be a whole number >= 1")
    wrong_type = run_python("-m", "nanopali.train", "--out", str(tmp_path / "model"), "--steps", "many")
    assert (wrong_type.returncode, one_line(wrong_type.stderr)) == (
        2, "nanopali.train: error: argument --steps: invalid int value: 'many' (see python -m nanopali.train --help)")
    assert list(tmp_path.iterdir()) == []


def test_a_finished_run_grows_with_more_steps_at_the_schedules_final_rate(tmp_path, capsys, float32_steps):
    cfg = tiny_run(tmp_path, 6, warmup=2, log_every=1, batch_size=2, eval_scenes=1)
    train(cfg, progress=False)
    log = tmp_path / "model.log.jsonl"
    first = log.read_text().splitlines()
    longer = dataclasses.replace(cfg, steps=9, eval_every=3, checkpoint_every=2, eval_scenes=2)  # these may change
    train(longer, progress=False)
    assert capsys.readouterr().out.strip() == (
        "extending stage 1 from 6 to 9 steps: the learning-rate schedule keeps the length the run started with (6 "
        "steps), so the steps past it train at its final rate, 0.1 x the peak")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert log.read_text().splitlines()[:6] == first and [r["step"] for r in records] == list(range(1, 10))
    assert all(r["lr_text"] == pytest.approx(cfg.lr * cfg.final_lr_fraction) for r in records[6:])
    train(dataclasses.replace(longer, steps=10), progress=False)  # again: the schedule still has the first length
    assert "(6 steps)" in capsys.readouterr().out
    assert json.loads(log.read_text().splitlines()[-1])["lr_text"] == pytest.approx(cfg.lr * cfg.final_lr_fraction)
    assert torch.load(tmp_path / "model.checkpoint.pt", weights_only=False)["schedule_steps"] == 6


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "model.checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    monkeypatch.setattr(trainer, "build", no_work)
    with pytest.raises(ValueError, match=r"model.checkpoint.pt cannot be read \(.*\): remove it, or start over with "
                                         r"--no-resume"):
        train(tiny_run(tmp_path, 5), progress=False)


@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_a_full_disk_while_checkpointing_gets_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "run.checkpoint.pt"
    save_checkpoint(path, step=1, model={"w": torch.ones(3)})

    def full(obj, f, *args, **kwargs):
        with open(f, "wb") as half:
            half.write(b"x" * 4096)
        if failure == "torch":  # what torch 2.x raises when the disk fills during torch.save
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda folder: SimpleNamespace(total=10**9, used=10**9, free=0))
    with pytest.raises(OSError) as refused:
        save_checkpoint(path, step=2, model={"w": torch.zeros(3)})
    assert str(refused.value) == (f"no space left on device while writing {path}: free some space; the previous "
                                  "checkpoint is intact")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.checkpoint.pt"]
    assert torch.load(path, weights_only=False)["step"] == 1


def test_a_failed_torch_write_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "run.checkpoint.pt"

    def failing(obj, f, *args, **kwargs):
        open(f, "wb").close()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda folder: SimpleNamespace(total=10**9, used=0, free=10**9))
    with pytest.raises(OSError, match=r"could not write .*run.checkpoint.pt \(\[enforce fail at inline_container.cc:"
                                      r"672\] . unexpected pos 576 vs 534\); no checkpoint has been written yet"):
        save_checkpoint(path, step=1)
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_says_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys, float32_steps):
    saves = {"n": 0}
    real_save = torch.save

    def full_on_the_second(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_the_second)
    out = tmp_path / "model"
    assert main(["--out", str(out), *TINY]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"nanopali.train: error: no space left on device while writing {tmp_path / 'model.checkpoint.pt'}: free some "
        "space; the previous checkpoint is intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.checkpoint.pt", "model.log.jsonl"]


def test_a_stale_temporary_checkpoint_is_deleted_when_a_run_starts(tmp_path, capsys, float32_steps):
    stale = tmp_path / "model.checkpoint.pt.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(tiny_run(tmp_path, 2, batch_size=2, eval_scenes=1), progress=False)
    assert not stale.exists()
    assert f"deleted {stale}, left by a run stopped while saving a checkpoint" in capsys.readouterr().out


def test_a_log_line_cut_off_by_a_kill_is_dropped_when_resuming(tmp_path, monkeypatch, capsys, float32_steps):
    cfg = tiny_run(tmp_path, 8, checkpoint_every=3, log_every=1, batch_size=2, eval_scenes=1)
    interrupt_after(5, cfg, monkeypatch)
    log = tmp_path / "model.log.jsonl"
    log.write_text(log.read_text() + '{"step": 6, "stage": "ta')  # killed in the middle of writing a line
    train(cfg, progress=False)
    assert f"dropped the last line of {log}: it was cut off by a run stopped while writing it" in \
        capsys.readouterr().out
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 9))


def test_a_damaged_log_line_before_the_last_is_refused(tmp_path, monkeypatch, float32_steps):
    cfg = tiny_run(tmp_path, 8, checkpoint_every=3, log_every=1, batch_size=2, eval_scenes=1)
    interrupt_after(5, cfg, monkeypatch)
    log = tmp_path / "model.log.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = lines[1][:12]
    log.write_text("".join(line + "\n" for line in lines))
    before = digest(tmp_path)
    monkeypatch.setattr(trainer, "build", no_work)
    with pytest.raises(ValueError) as refused:
        train(cfg, progress=False)
    assert str(refused.value) == (f"line 2 of {log} is damaged (not a record of this log): delete that line to "
                                  "resume, or start over with --no-resume")
    assert digest(tmp_path) == before


def test_ctrl_c_says_where_the_checkpoint_is_and_the_same_command_resumes(tmp_path, monkeypatch, capsys, float32_steps):
    out = tmp_path / "model"
    calls = {"n": 0}
    real_batch = trainer.make_batch

    def stop_at_the_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "make_batch", stop_at_the_third_step)
        args = ["--out", str(out), "--pretrain-steps", "0", "--steps", "6", "--batch-size", "2", "--warmup", "1",
                "--eval-scenes", "1", "--checkpoint-every", "2", "--final-eval-scenes", "1"]
        assert main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"nanopali.train: interrupted: the last checkpoint is {tmp_path / 'model.checkpoint.pt'} (step 2 of 6); run "
        "the same command to resume from it")
    assert not out.exists()  # a run stopped half-way has a checkpoint but no model folder yet
    assert main(args) == 0
    assert (out / "eval.json").is_file()


def test_ctrl_c_before_the_first_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "make_batch", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["--out", str(tmp_path / "model"), "--pretrain-steps", "0", "--steps", "4"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "nanopali.train: interrupted before this run's first checkpoint (every 250 steps): run the same command to "
        "start again")


def test_ctrl_c_on_the_command_line_is_one_line_not_a_traceback(tmp_path):
    out = tmp_path / "model"
    checkpoint = tmp_path / "model.checkpoint.pt"
    run = subprocess.Popen([sys.executable, "-m", "nanopali.train", "--out", str(out), "--pretrain-steps", "100000",
                            "--pretrain-batch-size", "1", "--steps", "0", "--warmup", "1", "--checkpoint-every", "2"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"nanopali.train: interrupted: the last checkpoint is {checkpoint} (step "), last
    assert last.endswith(" of 100000); run the same command to resume from it"), last
    assert not (tmp_path / "model.checkpoint.pt.tmp").exists()


@pytest.mark.parametrize("seed", range(8))
def test_patch_targets_agree_with_the_masks(seed):
    """Every patch labelled with an object holds at least a tenth of it (of the scene seen at 112 pixels), with the
    object's shape, colour and box; a background patch holds less than a tenth of any object. For a scene drawn at
    another side, the patch's part of the drawn mask agrees within the resizing's blur."""
    side = (112, 224, 168, 140)[seed % 4]  # multiples of 28: each patch is a whole block of drawn pixels
    image, objects, masks = make_scene(np.random.default_rng([seed, 5]), side, with_masks=True)
    targets = patch_targets(masks, objects, 112, 14)
    cell = side // 8
    slack = 0 if side == 112 else 0.06
    for patch in range(64):
        share = [(m[patch // 8 * cell:(patch // 8 + 1) * cell, patch % 8 * cell:(patch % 8 + 1) * cell] > 0).mean()
                 for m in masks]
        if targets["shape"][patch] == 0:
            assert max(share) < 0.1 + slack and targets["colour"][patch] == 0 and not targets["box"][patch].any()
            continue
        o = objects[int(np.argmax(share))]
        assert max(share) >= 0.1 - slack
        assert SHAPES[targets["shape"][patch] - 1] == o.shape
        assert sorted(COLOURS)[targets["colour"][patch] - 1] == o.colour
        torch.testing.assert_close(targets["box"][patch], torch.tensor(o.box, dtype=torch.float32) / side)
    assert (targets["shape"] > 0).sum() >= len(objects)  # every object owns at least one patch


def test_probe_loss_ignores_boxes_on_background():
    _, objects, masks = make_scene(np.random.default_rng(3), with_masks=True)
    targets = {k: v[None] for k, v in patch_targets(masks, objects, 112, 14).items()}
    predicted = {"shape": torch.randn(1, 64, 1 + len(SHAPES)), "colour": torch.randn(1, 64, 1 + len(COLOURS)),
                 "box": targets["box"] + 0.01}
    loss, scores = probe_loss(predicted, targets)
    moved = {**predicted, "box": predicted["box"].clone()}
    moved["box"][targets["shape"] == 0] += 5.0
    assert torch.equal(probe_loss(moved, targets)[0], loss)
    moved["box"][targets["shape"] != 0] += 0.1
    assert probe_loss(moved, targets)[0] > loss
    assert set(scores) == {"patch_shape", "patch_colour", "box_error"}


def test_pretraining_lowers_the_probe_loss(tmp_path):
    train(tiny_run(tmp_path, 0, pretrain_steps=40, pretrain_batch_size=8, log_every=5), progress=False)
    records = [json.loads(line) for line in open(tmp_path / "model.log.jsonl")]
    assert {r["stage"] for r in records} == {"pretrain"}
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]


# The exercises' checks (nanopali/exercises/lesson08.py): each refuses plausible wrong answers, accepts a right one.

def _answer_loss(token_mean=False, shift=True):
    def answer_loss(logits, input_ids, token_type_ids):
        labels = input_ids.masked_fill(token_type_ids == 0, -100)
        predictions, targets = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
        if token_mean:
            return torch.nn.functional.cross_entropy(predictions.transpose(1, 2), targets, ignore_index=-100)
        per_token = torch.nn.functional.cross_entropy(predictions.transpose(1, 2), targets, ignore_index=-100,
                                                      reduction="none")
        counted = targets != -100
        return ((per_token * counted).sum(1) / counted.sum(1)).mean()
    return answer_loss


def test_check_answer_loss_refuses_a_token_mean_and_a_missing_shift(capsys):
    from nanopali.exercises.lesson08 import check_answer_loss

    assert not check_answer_loss(_answer_loss(token_mean=True))
    assert "average each sequence's answer first" in capsys.readouterr().out
    assert not check_answer_loss(_answer_loss(shift=False))
    assert "t + 1" in capsys.readouterr().out
    assert not check_answer_loss(lambda logits, ids, types: suffix_loss(logits, ids))  # prompt counted too
    assert check_answer_loss(_answer_loss())


def _wsd(zero_start=False, clamp=True):
    import math

    def wsd_factor(step, steps, warmup, decay, final):
        if step < warmup:
            return step / warmup if zero_start else (step + 1) / warmup
        progress = max(0.0, (step - (steps - decay)) / decay)
        progress = min(1.0, progress) if clamp else progress
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return wsd_factor


def test_check_wsd_factor_refuses_a_zero_first_step_and_a_decay_past_the_end(capsys):
    from nanopali.exercises.lesson08 import check_wsd_factor

    assert not check_wsd_factor(_wsd(zero_start=True))
    assert "at step 0" in capsys.readouterr().out
    assert not check_wsd_factor(_wsd(clamp=False))
    assert "at step 130" in capsys.readouterr().out
    assert not check_wsd_factor(lambda step, steps, warmup, decay, final: 1.0)
    assert check_wsd_factor(_wsd())


def _match_detections(one_to_one=True, check_name=True):
    def match_detections(answer, suffix, image_size):
        predicted, wanted = parse_detections(answer, image_size), parse_detections(suffix, image_size)
        pairs = sorted(((iou(b, t), i, j) for i, (n, b) in enumerate(predicted) for j, (name, t) in enumerate(wanted)
                        if n == name or not check_name), reverse=True)
        boxes, objects = set(), set()
        for overlap, i, j in pairs:
            if overlap > 0.5 and (not one_to_one or (i not in boxes and j not in objects)):
                boxes.add(i)
                objects.add(j)
        return (len(boxes) / len(predicted) if predicted else 0.0), len(objects) / len(wanted)
    return match_detections


def _any_box(answer, suffix, image_size):  # lesson 08's score: extra boxes cost nothing
    predicted, wanted = parse_detections(answer, image_size), parse_detections(suffix, image_size)
    found = sum(any(n == name and iou(b, t) > 0.5 for n, b in predicted) for name, t in wanted)
    return (1.0 if predicted else 0.0), found / len(wanted)


def test_check_match_detections_refuses_matching_that_is_not_one_to_one(capsys):
    from nanopali.exercises.lesson08 import check_match_detections

    assert not check_match_detections(_any_box)
    assert "boxed twice" in capsys.readouterr().out
    assert not check_match_detections(_match_detections(one_to_one=False))
    assert "boxed twice" in capsys.readouterr().out
    assert not check_match_detections(_match_detections(check_name=False))
    assert "names swapped" in capsys.readouterr().out
    assert check_match_detections(_match_detections())
