"""The command line, `python -m nanopali`: answers on the shipped model, writes its pictures, and every mistake gets
one line and a non-zero exit status."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

from nanopali.__main__ import as_prompt, main

from conftest import REPO, run_python

SCENE = str(REPO / "images" / "scene.png")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def assert_png(path):
    with Image.open(path) as png:
        png.verify()
        assert png.format == "PNG"


def test_a_question_answered_end_to_end_with_its_attention_map(tmp_path):
    "The README's demo, as a real process."
    out = tmp_path / "attention.png"
    result = run_python("-m", "nanopali", "--image", "images/scene.png", "--prompt", "what color is the star?",
                        "--attention-map", str(out), cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: cpu (float32, ")  # the shipped model: float32 unless asked otherwise
    assert "loaded in" in lines[1] and "2,967,456 parameters" in lines[1]
    assert lines[3] == "green"
    assert lines[4].startswith("  [2 tokens in ") and lines[4].endswith(" s]")
    assert f"attention map (4 layers x 4 heads, averaged): {out}" in result.stdout
    assert_png(out)
    assert result.stderr == ""


def test_detection_draws_the_boxes(tmp_path, capsys):
    out = tmp_path / "boxes.png"
    assert main(["--image", SCENE, "--prompt", "detect star ; circle", "--boxes", str(out), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "<loc0804><loc0612><loc0968><loc0776> star ; <loc0128><loc0365><loc0365><loc0603> circle" in printed
    assert "2 box(es) drawn" in printed
    assert_png(out)
    assert Image.open(out).size == (448, 448)


def test_boxes_asked_of_an_answer_without_boxes_say_so(tmp_path, capsys):
    out = tmp_path / "boxes.png"
    assert main(["--image", SCENE, "--prompt", "caption en", "--boxes", str(out)]) == 0
    assert "no boxes in this answer: ask 'detect THING'" in capsys.readouterr().out
    assert not out.exists()


def test_boxes_that_cannot_be_read_write_nothing(tmp_path, capsys, monkeypatch):
    "An answer whose boxes cannot be read (here a stand-in for the model) writes no picture."
    cut_short = SimpleNamespace(text="<loc0100><loc0200> star", tokens=["<loc0100>", "<loc0200>", "▁star", "<eos>"])
    monkeypatch.setattr("nanopali.visualize.generate_with_attention", lambda *a, **k: cut_short)
    out = tmp_path / "boxes.png"
    assert main(["--image", SCENE, "--prompt", "detect star", "--boxes", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "could not read a box: '<loc0100><loc0200> star': expected four <locNNNN> tokens" in printed
    assert f"no box could be read, nothing written to {out}" in printed
    assert not out.exists()


def test_an_answer_stopped_by_the_token_limit_says_so(capsys):
    assert main(["--image", SCENE, "--prompt", "caption en", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "a large purple\n  [3 tokens in " in out
    assert "(stopped at --max-new-tokens 3: the answer may be cut off)" in out


def test_int8_answers_the_same(capsys):
    assert main(["--image", SCENE, "--prompt", "caption en", "--int8"]) == 0
    out = capsys.readouterr().out
    assert "int8: the language model's weights quantized in" in out
    assert "\na large purple triangle, a small red circle and a small green star\n" in out


def test_the_shipped_model_warns_about_photos(capsys):
    assert main(["--image", str(REPO / "images" / "chelsea.png"), "--prompt", "caption en",
                 "--max-new-tokens", "2"]) == 0
    assert "note: the shipped model has only ever seen square scenes of coloured shapes, 84 to 224 pixels a side" \
        in capsys.readouterr().out


def test_the_loop_asks_until_an_empty_line(monkeypatch, capsys):
    lines = iter(["caption en", "how many shapes are there?", ""])
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or next(lines))
    assert main(["--image", SCENE, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert asked == ["Ask anything: "] * 3
    assert "a large purple triangle, a small red circle and a small green star\n" in out
    assert "\n3\n" in out


def test_the_loop_ends_cleanly_on_ctrl_d():
    "The input ends (Ctrl-D) after one question, without an empty line."
    result = subprocess.run([sys.executable, "-m", "nanopali", "--image", "images/scene.png"], cwd=REPO,
                            input="is there a square?\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Ask anything: no\n" in result.stdout
    assert result.stderr == ""


def test_sampling_with_a_seed_repeats(capsys):
    argv = ["--image", SCENE, "--prompt", "caption en", "--sample", "--temperature", "1.5", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[3]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[3] == first


@pytest.mark.parametrize("argv, says", [
    (["--image", "images/no_such.png"], "no_such.png"),
    (["--image", SCENE, "--weights", "weights/paligemma-3b-mix-224"],
     "weights folder 'weights/paligemma-3b-mix-224' not found (download a checkpoint into weights/: see the README)"),
    (["--image", SCENE, "--weights", "images"], "images has no config.json: it is not a PaliGemma checkpoint folder"),
    (["--image", SCENE, "--prompt", "  "], "the prompt is empty"),
    (["--image", SCENE, "--attention-map", "map.gif"], "give a file name ending in .png or .jpg"),
    (["--image", SCENE, "--boxes", "no_such_folder/b.png"], "the folder 'no_such_folder' does not exist"),
    (["--image", SCENE, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--image", SCENE, "--dtype", "float16"], "float16 on the CPU is refused"),
    (["--image", SCENE, "--device", "cuda:7"], "not available on this machine"),
    (["--image", SCENE, "--prompt", "caption en", "--sample", "--temperature", "0"], "temperature must be > 0"),
    (["--image", SCENE, "--temperature", "0.1", "--seed", "3"],
     "--temperature, --seed only apply when sampling: add --sample"),
    (["--image", SCENE, "--weights", "weights/nanopali-shapes/config.json"], "is a file: give the folder"),
])
def test_mistakes_get_one_line_and_exit_1(argv, says, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(argv) == 1
    line = one_line_error(capsys)
    assert line.startswith("nanopali: error: ") and says in line


@pytest.mark.parametrize("argv, says", [
    ([], "the following arguments are required: --image"),
    (["--image", SCENE, "--max-new-tokens", "many"], "invalid int value: 'many'"),
    (["--image", SCENE, "--colour"], "unrecognized arguments: --colour"),
    (["--image", SCENE, "--dtype", "int8"], "invalid choice: 'int8'"),
])
def test_a_bad_command_line_gets_one_line_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    line = one_line_error(capsys)
    assert says in line and line.endswith("(see python -m nanopali --help)")


def test_a_missing_image_as_a_real_process():
    result = run_python("-m", "nanopali", "--image", "nope.jpg", cwd=REPO)
    assert result.returncode == 1
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("nanopali: error: nope.jpg")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--weights", "--image", "--prompt", "--max-new-tokens", "--sample", "--temperature", "--top-k",
                 "--int8", "--top-p", "--seed", "--device", "--dtype", "--attention-map", "--boxes", "--overwrite",
                 "Ask anything",
                 "detect star ; circle", "answer en"]:
        assert flag in text, flag


@pytest.mark.parametrize("typed, prompt", [
    ("caption en", "caption en"),
    ("what color is the star?", "answer en what color is the star?"),
    ("  detect   cat ", "detect cat"),
    ("Answer en why?", "answer en why?"),
    ("Caption EN", "caption en"),
    ("Detect Red Star", "detect Red Star"),
    ("describe the picture", "answer en describe the picture"),
    ("ocr", "ocr"),
    ("detect", "answer en detect"),
])
def test_plain_questions_become_answer_prompts(typed, prompt):
    assert as_prompt(typed) == prompt


# Issue 15: nothing the user owns is overwritten, and every mistake is one true line, before the model loads.

def digest(path) -> bytes:
    import hashlib

    return hashlib.sha256(path.read_bytes()).digest()


def refuse_to_load(monkeypatch):
    "Any test using this proves its refusal came before the model was loaded."
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr("nanopali.paligemma.load", load)


@pytest.mark.parametrize("flag", ["--attention-map", "--boxes"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_output_that_is_the_input_image_is_refused(flag, overwrite, tmp_path, capsys, monkeypatch):
    photo = tmp_path / "photo.png"
    photo.write_bytes((REPO / "images" / "scene.png").read_bytes())
    before = digest(photo)
    refuse_to_load(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["--image", str(photo), "--prompt", "detect star", flag, "../" + tmp_path.name + "/photo.png",
                 *overwrite]) == 1
    line = one_line_error(capsys)
    assert "is the input image: writing the picture would destroy it" in line
    assert digest(photo) == before


@pytest.mark.parametrize("flag", ["--attention-map", "--boxes"])
def test_an_existing_picture_is_kept_unless_overwrite_is_given(flag, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's own picture")
    argv = ["--image", SCENE, "--prompt", "detect star ; circle", flag, str(out), "--dtype", "float32"]
    with monkeypatch.context() as patched:
        refuse_to_load(patched)
        assert main(argv) == 1
    assert f"{flag} '{out}' already exists: add --overwrite to replace it" in one_line_error(capsys)
    assert out.read_bytes() == b"the user's own picture"
    assert main([*argv, "--overwrite"]) == 0
    assert_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.png"]  # no partial file left beside it
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("argv, says", [
    (["--attention-map", "same.png", "--boxes", "./same.png"], "--attention-map and --boxes name the same file"),
    (["--boxes", "a_folder.png"], "--boxes 'a_folder.png' is a folder"),
    (["--prompt", "caption \udcff"], "--prompt is not valid UTF-8 text"),
    (["--prompt", "x", "--sample", "--temperature", "1e-300"],
     "--temperature must be finite and at least 0.001 when sampling, got 1e-300"),
    (["--prompt", "x", "--sample", "--temperature", "inf"], "--temperature must be finite"),
    (["--prompt", "x", "--sample", "--temperature", "nan"], "--temperature must be a number, got nan"),
    (["--prompt", "x", "--sample", "--top-p", "nan"], "--top-p must be a number, got nan"),
    (["--prompt", "x", "--sample", "--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--prompt", "x", "--sample", "--seed", str(2**70)], "--seed must be between -2**63 and 2**64 - 1"),
    (["--prompt", "x", "--max-new-tokens", "100000"], "does not fit the model's context of 512 tokens"),
])
def test_mistakes_are_refused_before_the_model_loads(argv, says, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_folder.png").mkdir()
    monkeypatch.chdir(tmp_path)
    refuse_to_load(monkeypatch)
    assert main(["--image", SCENE, *argv]) == 1
    line = one_line_error(capsys)
    assert line.startswith("nanopali: error: ") and says in line and "internal error" not in line
    assert "do_sample" not in line  # the command line's words, not the API's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder.png"]


def test_a_closed_stdin_without_a_prompt_is_one_line():
    result = subprocess.run(["bash", "-c", f'"{sys.executable}" -m nanopali --image images/scene.png <&-'], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == ("nanopali: error: no --prompt, and no input to read questions from (stdin is closed): "
                             "give --prompt TEXT\n")


def test_a_line_that_is_not_utf8_is_refused_and_the_loop_goes_on():
    result = subprocess.run([sys.executable, "-m", "nanopali", "--image", "images/scene.png"], cwd=REPO,
                            input=b"caption \xff\nhow many shapes are there?\n", capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode() == "nanopali: error: that line is not valid UTF-8 text: type it again\n"
    assert "Ask anything: Ask anything: 3\n" in result.stdout.decode()


def test_a_prompt_that_is_not_utf8_as_a_real_process():
    result = subprocess.run([sys.executable.encode(), b"-m", b"nanopali", b"--image", b"images/scene.png",
                             b"--prompt", b"caption \xff"], cwd=REPO, capture_output=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.decode() == ("nanopali: error: --prompt is not valid UTF-8 text: type it again, or set your "
                                      "terminal to UTF-8\n")


@pytest.mark.parametrize("after", [0.3, 0.7, 1.0, 2.5])
def test_ctrl_c_at_any_moment_is_one_line(after):
    "While torch is imported, the model loads or the answer is written: the same one line and exit status 130."
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "nanopali", "--image", "images/scene.png", "--prompt",
                                "caption en", "--max-new-tokens", "400"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    if process.returncode == 0:  # it had already finished: nothing to interrupt (a very fast machine)
        pytest.skip("the run ended before the signal")
    if process.returncode == -2 and err == "" and " tokens in " in out:
        # the answer was complete and the Ctrl-C landed while the interpreter shut down, after which Python leaves
        # SIGINT to its default action (the process ends silently): there was nothing left to interrupt
        pytest.skip("the signal came after the answer, during the interpreter's shutdown")
    # 130, or ended by the signal itself (-2 here; seen when the Ctrl-C lands about 0.7 s in, during torch's import,
    # cause not found): a shell shows both as exit status 130, and the one line is printed either way.
    assert process.returncode in (130, -2), err
    assert err.strip() == "nanopali: interrupted"


def test_a_very_large_image_gets_one_note_not_pillows_warning(capsys, monkeypatch):
    "Between Pillow's limit and twice it, Pillow warns in two lines on stderr; the command line says it in one note."
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the scene's 12,544 pixels: over it, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning that escapes fails the test
        assert main(["--image", SCENE, "--prompt", "caption en", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "note: a very large image (12,544 pixels): it takes a while to shrink" in captured.out
    assert captured.err == ""


def test_the_temporary_picture_never_takes_the_name_of_a_users_file(tmp_path, capsys):
    "The picture is written under a fresh name, then renamed: a file named like an old temporary one is untouched."
    photo = tmp_path / ".att.partial.png"  # the temporary name an earlier version used for att.png
    photo.write_bytes((REPO / "images" / "scene.png").read_bytes())
    before = digest(photo)
    assert main(["--image", str(photo), "--prompt", "what color is the star?", "--attention-map",
                 str(tmp_path / "att.png")]) == 0
    assert digest(photo) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".att.partial.png", "att.png"]


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else
                        real_access(path, mode))  # as a user without write permission (tests may run as root)
    refuse_to_load(monkeypatch)
    assert main(["--image", SCENE, "--prompt", "detect star", "--boxes", str(tmp_path / "b.png")]) == 1
    assert "cannot write in the folder" in one_line_error(capsys)


def test_seed_alone_without_sample_is_one_flag_one_verb(capsys):
    assert main(["--image", SCENE, "--prompt", "caption en", "--seed", "3"]) == 1
    assert "--seed only applies when sampling: add --sample" in one_line_error(capsys)


def test_a_reader_that_stops_early_gets_no_error():
    "python -m nanopali ... | head -1: the pipe closes under the answer; no 'Broken pipe' error, no traceback."
    process = subprocess.Popen([sys.executable, "-m", "nanopali", "--image", "images/scene.png", "--prompt",
                                "caption en"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()  # as head does after its line
    err = process.stderr.read().decode()
    process.wait(timeout=300)
    assert err == "" and process.returncode == 0
