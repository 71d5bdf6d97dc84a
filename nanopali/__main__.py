"""The command line: `python -m nanopali --image PATH`, ask anything about an image.

Hand-written (no notebook exports it): lesson 07's `load` and `generate`, and lesson 09's boxes and attention maps,
behind a prompt. Without --weights it runs the small model lesson 08 trained (weights/nanopali-shapes); with
--weights DIR it runs any PaliGemma 1 or PaliGemma 2 folder, such as a real checkpoint downloaded into weights/.
"""

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "nanopali-shapes"
# PaliGemma's task prompts: "caption en", "answer en ...", "detect ...", "ocr", ...; anything else is a question
TASK_PROMPT = re.compile(r"(caption|describe|answer|question) [a-z]{2}\b.*|(detect|segment) .+|ocr", re.IGNORECASE)
PICTURE_TYPES = (".png", ".jpg", ".jpeg")

EXAMPLES = """examples:
  python -m nanopali --image images/scene.png
      the shipped model; asks "Ask anything:" until an empty line or Ctrl-D
  python -m nanopali --image images/scene.png --prompt "what color is the star?" --attention-map attention.png
  python -m nanopali --image images/scene.png --prompt "detect star ; circle" --boxes boxes.png
  python -m nanopali --image images/scene.png --prompt "segment star" --masks masks.png
  python -m nanopali --weights weights/paligemma-3b-mix-224 --image images/chelsea.png --prompt "caption en"
  python -m nanopali --weights weights/paligemma2-3b-mix-224 --image images/chelsea.png --prompt "caption en" --int8

prompts: PaliGemma's task prompts, "caption en", "describe en", "answer en QUESTION", "question en ANSWER",
"detect THING ; OTHER", "segment THING", "ocr" (en: the language). Anything else is asked as "answer en ...".
The shipped model knows only scenes of coloured shapes:
"caption en", "what color is the star?", "what shape is the red one?", "how many shapes are there?",
"is there a circle?", "detect star ; circle", "segment star"."""


class OneLineParser(argparse.ArgumentParser):
    "argparse, but a bad command line gets one line (and exit status 2), not the usage text."

    def error(self, message):
        self.exit(2, f"nanopali: error: {message} (see python -m nanopali --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m nanopali",
        description="Ask a PaliGemma model about an image: the small model the course trained (default) or a real "
                    "checkpoint folder. Prints the device, the load time, each answer and its generation time.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=SHIPPED, metavar="DIR",
                        help="a PaliGemma folder in the Hugging Face layout (default: the shipped "
                             "weights/nanopali-shapes)")
    parser.add_argument("--image", required=True, type=Path, metavar="PATH", help="the image: a jpg, png, ... file")
    parser.add_argument("--prompt", metavar="TEXT",
                        help="answer this prompt once and exit (default: ask 'Ask anything:' in a loop)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="the longest answer, in tokens (default 64: a segment answer takes 21 per object)")
    parser.add_argument("--sample", action="store_true", help="sample the answer instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="with --sample: the temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, metavar="K", help="with --sample: keep the K most likely tokens only")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="with --sample: keep the smallest set of tokens reaching probability P")
    parser.add_argument("--seed", type=int, help="with --sample: a seed, to repeat a sampled answer")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1, mps or auto (default: auto, the best available)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"],
                        help="weights' type (default: bfloat16, or float32 for the 12 MB shipped model, which was "
                             "scored in float32; float16 only on a GPU)")
    parser.add_argument("--int8", action="store_true",
                        help="store the language model's weights as int8 (lesson 10; CPU only): decoding about twice "
                             "as fast, the prompt about a fifth slower, answers nearly always the same")
    parser.add_argument("--attention-map", type=Path, metavar="OUT.png",
                        help="write where the model looked in the image while choosing each answer token (lesson "
                             "09), averaged over all layers and heads; in the question loop, each answer overwrites "
                             "it")
    parser.add_argument("--boxes", type=Path, metavar="OUT.png",
                        help="for a 'detect ...' prompt: write the image with the boxes found (overwritten by each "
                             "answer in the loop)")
    parser.add_argument("--masks", type=Path, metavar="OUT.png",
                        help="for a 'segment ...' prompt: write the image with the masks found (lesson 12), decoded "
                             "by the mask VQ-VAE in the --weights folder or --mask-decoder")
    parser.add_argument("--mask-decoder", type=Path, metavar="FILE.npz",
                        help="the mask VQ-VAE for --masks (default: the one .npz file in the --weights folder; for a "
                             "real PaliGemma, big_vision's vae-oid.npz)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --attention-map, --boxes and --masks replace files that already exist (without it "
                             "they are refused before anything runs; the input image is never replaced)")
    return parser


class UserError(Exception):
    "Something the user can fix: reported in one line."


def check_arguments(args) -> None:
    "Everything that can be checked before loading the model: nothing is loaded, read or written before this passes."
    if args.weights.is_file():
        raise UserError(f"--weights {str(args.weights)!r} is a file: give the folder that holds config.json and the "
                        "model's safetensors files")
    if not args.weights.is_dir():
        hint = " (download a checkpoint into weights/: see the README)" if args.weights != SHIPPED else ""
        raise UserError(f"weights folder {str(args.weights)!r} not found{hint}")
    if not (args.weights / "config.json").is_file():
        raise UserError(f"{args.weights} has no config.json: it is not a PaliGemma checkpoint folder")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("the prompt is empty: give a question or a task, e.g. --prompt 'caption en'")
    if args.prompt is not None and not is_utf8(args.prompt):
        raise UserError("--prompt is not valid UTF-8 text: type it again, or set your terminal to UTF-8")
    if args.prompt is None and (sys.stdin is None or sys.stdin.closed):
        raise UserError("no --prompt, and no input to read questions from (stdin is closed): give --prompt TEXT")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    context = context_length(args.weights)
    if args.max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context of {context} tokens "
                        "with the prompt: ask for fewer")
    unused = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                       ("--top-p", args.top_p), ("--seed", args.seed)) if value is not None]
    if unused and not args.sample:
        verb = "applies" if len(unused) == 1 else "apply"
        raise UserError(f"{', '.join(unused)} only {verb} when sampling: add --sample (without it the answer is "
                        "greedy)")
    check_sampling_flags(args)
    check_outputs(args)
    check_mask_decoder(args)


def is_utf8(text: str) -> bool:
    "False for text holding bytes that were not UTF-8 (Python keeps them as lone surrogates)."
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def context_length(folder: Path) -> int:
    "The model's context in tokens, from config.json (Gemma's 8192 when it does not say); load checks the rest."
    from .bridge import read_json

    text = read_json(folder / "config.json").get("text_config", {})
    value = text.get("max_position_embeddings", 8192) if isinstance(text, dict) else 8192
    return value if isinstance(value, int) and value > 0 else 8192


def check_sampling_flags(args) -> None:
    "The sampling settings, checked by the same function generate uses, with the flags' names in the message."
    from .gemma import check_sampling

    temperature = 1.0 if args.temperature is None else args.temperature
    try:
        check_sampling(args.sample, temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        name, rest = str(e).split(" ", 1)
        rest = rest.replace("for greedy use do_sample=False", "for greedy decoding leave out --sample")
        rest = rest.replace("for that, greedy: do_sample=False", "for that, leave out --sample")
        raise UserError(f"--{name.replace('_', '-')} {rest}") from None


def check_outputs(args) -> None:
    """The pictures to write: a .png or .jpg in an existing folder, never the input image nor each other, and not an
    existing file unless --overwrite says so."""
    outputs = [(flag, path) for flag, path in (("--attention-map", args.attention_map), ("--boxes", args.boxes),
                                               ("--masks", args.masks)) if path is not None]
    for flag, path in outputs:
        if path.suffix.lower() not in PICTURE_TYPES:
            raise UserError(f"{flag} {str(path)!r}: give a file name ending in .png or .jpg")
        if not path.resolve().parent.is_dir():
            raise UserError(f"{flag} {str(path)!r}: the folder {str(path.parent)!r} does not exist")
        if not os.access(path.resolve().parent, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {str(path)!r}: cannot write in the folder {str(path.parent)!r} (permission "
                            "denied): choose a folder you can write to")
        if same_file(path, args.image):
            raise UserError(f"{flag} {str(path)!r} is the input image: writing the picture would destroy it. Give "
                            "another file name")
        if path.is_dir():
            raise UserError(f"{flag} {str(path)!r} is a folder: give a file name ending in .png or .jpg")
        if path.exists() and not args.overwrite:
            raise UserError(f"{flag} {str(path)!r} already exists: add --overwrite to replace it, or give another "
                            "file name")
    for i, (flag, path) in enumerate(outputs):
        for other, other_path in outputs[i + 1:]:
            if same_file(path, other_path):
                raise UserError(f"{flag} and {other} name the same file: give each its own")


def check_mask_decoder(args) -> None:
    "--masks needs a mask VQ-VAE: the one .npz in the weights folder, or --mask-decoder; found before the model loads."
    if args.mask_decoder is not None and args.masks is None:
        raise UserError("--mask-decoder is only used with --masks: add --masks OUT.png, or leave it out")
    if args.masks is None:
        return
    from .segmentation import find_vae_file

    where = args.mask_decoder if args.mask_decoder is not None else args.weights
    try:
        args.mask_decoder = find_vae_file(where)
    except FileNotFoundError as e:
        raise UserError(f"--masks needs the mask VQ-VAE: {e}" + ("" if args.mask_decoder is not None else
                        "; or give it with --mask-decoder FILE.npz")) from None


def same_file(a: Path, b: Path) -> bool:
    "Whether two paths name the same file (through links and ../ too), whether or not it exists yet."
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def write_picture(path: Path, write) -> None:
    "write(to) writes the picture to a temporary file next to path, which then replaces path in one step."
    partial = path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix}")  # a name no one has
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def as_prompt(text: str) -> str:
    "A task prompt with its task word and language code in lower case, as the model learned them; else a question."
    text = " ".join(text.split())
    if not TASK_PROMPT.fullmatch(text):
        return f"answer en {text}"
    words = text.split(" ")
    keep_case = 1 if words[0].lower() in ("detect", "segment") else 2  # task word (and language code) lowered
    return " ".join([w.lower() for w in words[:keep_case]] + words[keep_case:])


def ask(model, processor, image, prompt: str, args, mask_decoder=None) -> None:
    """Answer one prompt, print the answer and its time, write the requested pictures (masks with mask_decoder, the
    VQ-VAE of lesson 12). The answer always comes from generate_with_attention, so that asking for the map never
    changes the answer it explains."""
    from .visualize import LOC_PATTERN, draw_attention, draw_boxes, generate_with_attention, parse_boxes

    temperature = 1.0 if args.temperature is None else args.temperature
    sampling = dict(do_sample=args.sample, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed)
    start = time.perf_counter()
    answer = generate_with_attention(model, processor, image, prompt, args.max_new_tokens, **sampling)
    seconds = time.perf_counter() - start
    text = answer.text
    print(text.strip() if text.strip() else "(an empty answer)")
    print(f"  [{len(answer.tokens)} tokens in {seconds:.2f} s]")
    if answer.tokens[-1] != "<eos>" and len(answer.tokens) == args.max_new_tokens:
        print(f"  (stopped at --max-new-tokens {args.max_new_tokens}: the answer may be cut off)")
    if args.attention_map is not None:
        layers, heads = answer.image_attention.shape[1:3]
        write_picture(args.attention_map, lambda to: draw_attention(image, answer, path=to))
        print(f"  attention map ({layers} layers x {heads} heads, averaged): {args.attention_map}")
    if args.boxes is not None and not LOC_PATTERN.search(text):
        hint = "" if prompt.startswith("detect ") else ": ask 'detect THING' to get some"
        print(f"  no boxes in this answer{hint} (nothing written to {args.boxes})")
    elif args.boxes is not None:
        detections, problems = parse_boxes(text, *image.size)
        for problem in problems:
            print(f"  could not read a box: {problem}")
        if detections:
            write_picture(args.boxes, draw_boxes(image, detections).save)
            print(f"  {len(detections)} box(es) drawn: {args.boxes}")
        else:
            print(f"  no box could be read, nothing written to {args.boxes}")
    if args.masks is not None:
        write_masks(image, text, prompt, args.masks, mask_decoder)


def write_masks(image, text: str, prompt: str, path: Path, decoder) -> None:
    "The masks of a segmentation answer drawn on the image, or one line saying why there are none."
    from .segmentation import draw_segments, parse_segments

    if "<seg" not in text:
        hint = "" if prompt.startswith("segment ") else ": ask 'segment THING' to get some"
        print(f"  no masks in this answer{hint} (nothing written to {path})")
        return
    segments, problems = parse_segments(text, *image.size, decoder)
    for problem in problems:
        print(f"  could not read a mask: {problem}")
    if segments:
        write_picture(path, draw_segments(image, segments).save)
        sizes = ", ".join(f"{s.label}: {int(s.mask.sum())} pixels" for s in segments)
        print(f"  {len(segments)} mask(s) drawn ({sizes}): {path}")
    else:
        print(f"  no mask could be read, nothing written to {path}")


def run(args) -> None:
    with ctrl_c_waits():  # the checks and the imports: torch's start-up runs C++ that a Ctrl-C must not interrupt
        check_arguments(args)
        import torch
        from PIL import Image

        from .paligemma import load, pick_device
        from .patches import load_image

    with warnings.catch_warnings():  # Pillow's two-line warning about very large images becomes one note below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = load_image(args.image)  # before the model: a wrong path fails in a second
    device = pick_device(args.device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    dtype = args.dtype or ("float32" if args.weights.resolve() == SHIPPED else "bfloat16")
    print(f"device: {device} ({dtype}{threads})")
    start = time.perf_counter()
    model, processor = load(args.weights, device=device, dtype=dtype)
    count = sum(p.numel() for p in model.parameters())
    shown = os.path.relpath(args.weights) if not os.path.relpath(args.weights).startswith("..") else args.weights
    print(f"model: {shown} ({count:,} parameters), loaded in {time.perf_counter() - start:.1f} s")
    if args.int8:
        if device.type != "cpu":
            raise UserError(f"--int8 uses a CPU kernel: leave it out on {device.type}, or use --device cpu")
        from .quantize import quantize_int8

        start = time.perf_counter()
        quantize_int8(model)
        print(f"int8: the language model's weights quantized in {time.perf_counter() - start:.1f} s")
    print(f"image: {args.image} ({image.width} x {image.height}, seen as {processor.image_size[1]} x "
          f"{processor.image_size[0]})")
    if Image.MAX_IMAGE_PIXELS is not None and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        print(f"note: a very large image ({image.width * image.height:,} pixels): it takes a while to shrink")
    if args.weights.resolve() == SHIPPED and not (image.width == image.height and 84 <= image.width <= 224):
        print("note: the shipped model has only ever seen square scenes of coloured shapes, 84 to 224 pixels a side, "
              "like images/scene.png; on other pictures its answers mean nothing. For photos, use a real PaliGemma "
              "(--weights).")
    mask_decoder = None
    if args.masks is not None:
        from .segmentation import load_mask_decoder

        mask_decoder = load_mask_decoder(args.mask_decoder)
        print(f"mask decoder: {args.mask_decoder} ({mask_decoder.config.num_codes} codes)")
    if args.prompt is not None:
        ask(model, processor, image, as_prompt(args.prompt), args, mask_decoder)
        return
    print("Ask about the image: 'caption en', 'detect THING', or any question. An empty line or Ctrl-D ends.")
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 get a message, instead of ending the loop
        sys.stdin.reconfigure(errors="surrogateescape")
    for flag, path in (("--attention-map", args.attention_map), ("--boxes", args.boxes), ("--masks", args.masks)):
        if path is not None:
            print(f"({flag}: each answer overwrites {path})")
    while True:
        try:
            line = input("Ask anything: ")
        except EOFError:
            print()
            return
        if not line.strip():
            return
        if not is_utf8(line):
            print("nanopali: error: that line is not valid UTF-8 text: type it again", file=sys.stderr)
            continue
        try:
            ask(model, processor, image, as_prompt(line), args, mask_decoder)
        except ValueError as e:  # e.g. a prompt too long for the model: say so and go on
            print(f"nanopali: error: {e}", file=sys.stderr)


INTERRUPTED = []  # set by on_ctrl_c: a Ctrl-C that a library turned into another error is still a Ctrl-C


WAITING = []  # non-empty while a Ctrl-C waits for the end of a ctrl_c_waits block


def on_ctrl_c(signum, frame):
    INTERRUPTED.append(signum)
    if not WAITING:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_waits():
    """Ctrl-C inside the block is kept, then acted on as the block ends. Importing torch runs Python code from C++
    (pybind11): a KeyboardInterrupt raised there aborts the whole process with a C++ traceback, not one line."""
    WAITING.append(True)
    try:
        yield
    finally:
        WAITING.pop()
    if INTERRUPTED:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return answer(argv)
    INTERRUPTED.clear()
    before = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        return answer(argv)
    finally:
        signal.signal(signal.SIGINT, before)


def answer(argv: list[str] | None) -> int:
    "The whole run, each way it can end turned into an exit status and at most one line on stderr."
    try:  # everything, imports included: Ctrl-C at any moment gets one line
        args = build_parser().parse_args(argv)
        run(args)
    except BrokenPipeError:  # the reader went away (python -m nanopali ... | head -1): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush goes nowhere, quietly
        return 0
    except Exception as e:
        if INTERRUPTED:  # e.g. Ctrl-C in the middle of importing torch, which it may report as another error
            print("\nnanopali: interrupted", file=sys.stderr)
            return 130
        return report(e)
    except KeyboardInterrupt:
        print("\nnanopali: interrupted", file=sys.stderr)
        return 130
    return 0


def report(e: Exception) -> int:
    "One line for an error: the user's mistake, or (a bug of ours) an internal error."
    if isinstance(e, (UserError, ValueError, OSError)):  # FileNotFoundError, lesson 01's ImageFileError, ...
        message = str(e)
    elif isinstance(e, MemoryError):
        message = "out of memory: a 3B model needs about 6 GB free in bfloat16 (--dtype bfloat16)"
    elif type(e).__name__ == "OutOfMemoryError":  # torch's, on a GPU
        message = ("out of GPU memory: use --dtype bfloat16, a smaller checkpoint (224 rather than 448 or 896), or "
                   "--device cpu")
    elif os.environ.get("NANOPALI_DEBUG"):  # a bug of ours: the traceback when asked for
        raise e
    else:
        print(f"nanopali: internal error: {type(e).__name__}: {e} (set NANOPALI_DEBUG=1 for the traceback, and "
              "please report it)", file=sys.stderr)
        return 1
    print(f"nanopali: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # in the instant before main's own handler is in place
        print("\nnanopali: interrupted", file=sys.stderr)
        sys.exit(130)
