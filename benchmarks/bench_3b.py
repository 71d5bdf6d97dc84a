"""nanopali against transformers at the real PaliGemma and PaliGemma 2 3B shapes, on the CPU, side by side.

    .venv/bin/python benchmarks/bench_3b.py                 # both models (about 10 minutes each on 2 cores)
    .venv/bin/python benchmarks/bench_3b.py --model paligemma2-3b-224      # one of them
    .venv/bin/python benchmarks/bench_3b.py --tiny          # tiny configs, a minute: checks the script works

For each model, writes a checkpoint with random weights and exactly its configuration, in bfloat16, once
(weights/random-3b-pt-224 for paligemma-3b-pt-224, weights/random-paligemma2-3b-224 for PaliGemma 2 3B at 224 px;
reused afterwards: the speed of a model does not depend on its values). Then measures, for nanopali, for
transformers and for nanopali's int8 on that checkpoint and one image, alternating them run after run:

- load: seconds to a model ready to run;
- peak memory: the peak resident memory of a separate process that loads the model and generates (so that the
  other model does not count);
- vision: the vision tower and the projector on one image;
- prefill: generating one token from 256 image + 10 text tokens, minus the vision time;
- decode: the median time between two generated tokens (greedy), over --tokens tokens and --repeats runs;
  also as a multiple of the bandwidth floor: the bytes of weights every token reads, divided by the memory
  read speed measured in the same run (summing a large tensor);
- re-encode: decoding the way the educational ports do it, running the vision tower again at every step.

transformers runs with its default attention (SDPA) for PaliGemma, and with eager attention in PaliGemma 2's text
model: its SDPA path cannot soft-cap the scores (Gemma 2 refuses it), eager is its reference. The notes say which.

Prints the CPU model, then a table per model, and writes them, with the machine's details, to
benchmarks/results.md (--out to change). Each model runs in a process of its own, one after the other; a run of one
model keeps the other model's table in that file when it was measured on the same CPU (and in the same mode, --tiny
or not).
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nanopali
import nanopali.gemma
from nanopali.bridge import IMAGE_TOKEN, PaliGemmaProcessor, build_tokenizer
from nanopali.gemma2 import PALIGEMMA2_3B_224_CONFIG
from nanopali.paligemma import PALIGEMMA_3B_PT_224_CONFIG, PaliGemmaConfig, PaliGemmaForConditionalGeneration
from nanopali.quantize import Int8Linear, quantize_int8

TINY_CONFIG = {
    "model_type": "paligemma", "image_token_index": None, "projection_dim": 64, "hidden_size": 64,
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 1,
                    "head_dim": 16, "num_hidden_layers": 2, "vocab_size": None, "model_type": "gemma"},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                      "patch_size": 14, "image_size": 224, "model_type": "siglip_vision_model"},
}
# PaliGemma 2's tiny config: a Gemma 2 text model with one sliding layer (window 128: shorter than the 266 tokens of
# the prompt, so the window is in play) and one global, caps small enough to matter, query_pre_attn_scalar != head_dim
TINY2_CONFIG = json.loads(json.dumps(TINY_CONFIG))
TINY2_CONFIG["text_config"].update(model_type="gemma2", num_key_value_heads=2, query_pre_attn_scalar=24,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=128)


class Model(NamedTuple):
    "One benchmarked model: its configuration (full and tiny), the folders of its random checkpoints, its names."

    config: dict
    tiny_config: dict
    folder: str  # under weights/
    tiny_folder: str
    title: str


MODELS = {
    "paligemma-3b-224": Model(PALIGEMMA_3B_PT_224_CONFIG, TINY_CONFIG, "random-3b-pt-224", "random-tiny",
                              "PaliGemma 1, paligemma-3b-pt-224 configuration"),
    "paligemma2-3b-224": Model(PALIGEMMA2_3B_224_CONFIG, TINY2_CONFIG, "random-paligemma2-3b-224",
                               "random-tiny-paligemma2", "PaliGemma 2, paligemma2-3b-pt-224 configuration"),
}


def gemma_layout_tokenizer(pieces: int):
    """Lesson 03's tokenizer, stretched to the real one's id layout: its learned pieces, then filler pieces up to
    `pieces` ids (256,000 for the real model), then the 1024 <loc>, the 128 <seg> and <image> (257,152 for the real
    model). A benchmark needs the ids, not good pieces."""
    from tokenizers import Tokenizer

    data = json.loads(build_tokenizer(["caption en"], vocab_size=300).to_str())
    vocab = data["model"]["vocab"]
    shift = pieces - len(vocab)  # the <loc>, <seg> and <image> ids move up by this much
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), pieces)})
    for token in data["added_tokens"]:
        if token["id"] >= pieces - shift:
            token["id"] += shift
    return Tokenizer.from_str(json.dumps(data))


def write_checkpoint(folder: Path, config: dict, tiny: bool) -> None:
    """A checkpoint with random bfloat16 weights and the given config.json content (tiny: its vocab_size and
    image_token_index are filled in), built without ever holding a float32 copy."""
    config = json.loads(json.dumps(config))
    tokenizer = gemma_layout_tokenizer(1000 if tiny else 256_000)
    if tiny:
        config["image_token_index"] = tokenizer.token_to_id(IMAGE_TOKEN)
        config["text_config"]["vocab_size"] = tokenizer.get_vocab_size()
    assert config["image_token_index"] == tokenizer.token_to_id(IMAGE_TOKEN)
    pali_config = PaliGemmaConfig.from_dict(config)
    with torch.device("meta"):  # shapes only; made bfloat16 there, then given (uninitialised) memory
        model = PaliGemmaForConditionalGeneration(pali_config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=generator)
    processor = PaliGemmaProcessor(tokenizer, num_image_tokens=pali_config.vision.num_patches,
                                   image_size=(pali_config.vision.image_size,) * 2)
    nanopali.save(model, processor, folder)


def the_inputs(processor):
    "One image and a prompt of 10 text tokens (<bos>, 8 bytes, \\n): the 256 + 10 tokens of the issue."
    return processor([REPO / "images" / "chelsea.png"], ["abcdefgh"])


class Stamps:
    "Record the time of every call of a sampling function: the gaps between calls are the decode steps."

    def __init__(self):
        self.times = []

    def __call__(self, *args, **kwargs):
        self.times.append(time.perf_counter())


def reference_attention(folder: Path) -> dict | None:
    """The attn_implementation transformers is asked for: its default (SDPA) for PaliGemma; eager attention in
    PaliGemma 2's text model, whose scores are soft-capped (transformers' eager path is its reference)."""
    text = json.loads((folder / "config.json").read_text()).get("text_config", {})
    return {"text_config": "eager"} if text.get("model_type") == "gemma2" else None


def attention_used(model) -> str:
    "What attention the loaded transformers model runs, in words: its text and vision models' implementations."
    config = model.config
    return (f"text model {config.text_config._attn_implementation}, vision tower "
            f"{config.vision_config._attn_implementation}")


def load(impl: str, folder: Path):
    "impl: nanopali, nanopali-int8 (lesson 10's weight-only int8) or transformers."
    if impl.startswith("nanopali"):
        model, _ = nanopali.load(folder, device="cpu", dtype="bfloat16", progress=False)
        model.language_model.config.eos_token_id = -1  # random weights: never stop early
        return quantize_int8(model) if impl == "nanopali-int8" else model
    import transformers

    attention = reference_attention(folder)
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.bfloat16, **({"attn_implementation": attention} if attention else {})).eval()
    if attention and model.config.text_config._attn_implementation != attention["text_config"]:
        raise RuntimeError(f"transformers runs {attention_used(model)}, not the eager text attention asked for")
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def vision(impl: str, model, inputs) -> None:
    pixels = inputs["pixel_values"].to(torch.bfloat16)
    if impl.startswith("nanopali"):
        model.multi_modal_projector(model.vision_tower(pixels))
    else:
        model.get_image_features(pixel_values=pixels)


@torch.inference_mode()
def generate(impl: str, model, inputs, new_tokens: int, stamps=None, reencode: bool = False):
    "Greedy generation of exactly new_tokens tokens; stamps (if given) records when each token was chosen."
    if impl.startswith("nanopali"):
        original = nanopali.gemma.sample_next_token

        def sample(*args, **kwargs):
            if stamps is not None:
                stamps()
            if reencode:  # the educational ports: the image through the vision tower again, every step
                model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
            return original(*args, **kwargs)

        nanopali.gemma.sample_next_token = sample
        try:
            embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
            return nanopali.gemma.generate_tokens(model.language_model, embeds, inputs["attention_mask"],
                                                  inputs["token_type_ids"], max_new_tokens=new_tokens)
        finally:
            nanopali.gemma.sample_next_token = original
    import transformers

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            if stamps is not None:
                stamps()
            return scores

    return model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          token_type_ids=inputs["token_type_ids"], pixel_values=inputs["pixel_values"],
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          logits_processor=transformers.LogitsProcessorList([Stamp()]), pad_token_id=0)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bandwidth(size_bytes: int = 2**30, repeats: int = 5) -> tuple[float, float]:
    """Bytes per second this machine (read, copy): summing a large tensor reads each byte once; copying one moves
    size bytes (read, then written). The best of a few of each. Decoding reads weights: the read speed is its floor."""
    src = torch.ones(size_bytes // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    read = min(timed(lambda: src.sum()) for _ in range(repeats))
    copy = min(timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return size_bytes / read, size_bytes / copy


def weights_read_per_token(folder: Path) -> int:
    "Bytes of the weights a decode step reads: the language model's layers and its (tied) output head."
    from safetensors import safe_open

    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    total = 0
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for name in f.keys():
            if name.startswith("language_model."):
                tensor = f.get_slice(name)
                total += math.prod(tensor.get_shape()) * sizes[tensor.get_dtype()]
    return total


@torch.inference_mode()
def int8_quality(bf16_model, int8_model, inputs, tokens: int):
    """Teacher-forced comparison on the prompt plus the tokens bfloat16 generates: the share of positions whose best
    next token is the same, the largest logit difference, and the span of the bfloat16 logits."""
    new = generate("nanopali", bf16_model, inputs, tokens)
    logits = []
    for model in (bf16_model, int8_model):
        embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
        embeds = torch.cat([embeds, model.language_model.model.embed(new)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        types = torch.cat([inputs["token_type_ids"], torch.ones_like(new)], dim=1)
        out = model.language_model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types)
        logits.append(out[0, -tokens - 1 :].float())  # the positions that choose the last prompt token onwards
    agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
    return agree, (logits[0] - logits[1]).abs().max().item(), (logits[0].max() - logits[0].min()).item()


def own_peak_kib() -> int:
    """KiB: this process's peak resident memory since it started its program. /proc's VmHWM, not getrusage's
    ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's size at the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_peak_memory(impl: str, folder: Path, tokens: int, threads: int) -> float:
    "GiB: the peak resident memory of a fresh process that loads the model and generates."
    code = (f"import sys, torch; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); torch.set_num_threads("
            f"{threads}); import bench_3b as b; from pathlib import Path; f = Path({str(folder)!r}); "
            f"m = b.load({impl!r}, f); p = b.PaliGemmaProcessor.from_folder(f); "
            f"b.generate({impl!r}, m, b.the_inputs(p), {tokens}); print(b.own_peak_kib())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024 / 2**30


def cpu_name() -> str:
    "The CPU's model name, as /proc/cpuinfo (or lscpu) gives it: what decides how fast these kernels run."
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import transformers

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu_name()}, {os.cpu_count()} cores, {memory:.0f} GiB; Python {platform.python_version()}, torch "
            f"{torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")


def bench_model(key: str, folder: Path, args) -> str:
    "Measure one model on its random checkpoint (written first if absent): its section of results.md."
    spec = MODELS[key]
    if not (folder / "model.safetensors").is_file():
        print(f"writing a random checkpoint to {folder} (once) ...", flush=True)
        write_checkpoint(folder, spec.tiny_config if args.tiny else spec.config, args.tiny)
    checkpoint_gib = (folder / "model.safetensors").stat().st_size / 2**30
    impls = ["nanopali", "transformers", "nanopali-int8"]

    print(f"\n{spec.title}: peak memory, each in a fresh process ...", flush=True)
    peak = {impl: child_peak_memory(impl, folder, args.tokens, args.threads) for impl in impls}
    processor = PaliGemmaProcessor.from_folder(folder)
    inputs = the_inputs(processor)
    text_tokens = int((inputs["input_ids"] != processor.image_token_id).sum())
    image_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    models, load_s = {}, {}
    for impl in impls:
        start = time.perf_counter()
        models[impl] = load(impl, folder)
        load_s[impl] = time.perf_counter() - start
    reference = attention_used(models["transformers"])
    print(f"transformers runs with attention: {reference}", flush=True)
    bytes_per_token = weights_read_per_token(folder)
    bw_size = 2**28 if args.tiny else 2**30
    bw, copy_bw = bandwidth(bw_size)
    int8_bytes = sum(m.weight_int8.numel() + 4 * m.scale.numel() for m in models["nanopali-int8"].modules()
                     if isinstance(m, Int8Linear))
    int8_bytes += sum(p.numel() * p.element_size() for n, p in models["nanopali-int8"].language_model.named_parameters()
                      if "norm" in n)  # what else a decode step reads (the embedding table: one row)

    results = {impl: {"vision": [], "prefill": [], "decode": []} for impl in impls}
    for impl in impls:  # warm-up: transformers' memory-mapped weights are paged in, kernels are chosen
        generate(impl, models[impl], inputs, 2)
    for rep in range(args.repeats):
        for impl in impls if rep % 2 == 0 else impls[::-1]:  # alternate the order
            model, r = models[impl], results[impl]
            v = timed(lambda impl=impl, model=model: vision(impl, model, inputs))
            one = timed(lambda impl=impl, model=model: generate(impl, model, inputs, 1))
            stamps = Stamps()
            generate(impl, model, inputs, args.tokens + 1, stamps)
            r["vision"].append(v)
            r["prefill"].append(one - v)
            r["decode"] += [b - a for a, b in zip(stamps.times, stamps.times[1:])]
            print(f"run {rep + 1}/{args.repeats} {impl:12s} vision {v:.3f} s, prefill {one - v:.3f} s, decode "
                  f"{statistics.median(r['decode'][-args.tokens:]) * 1e3:.1f} ms/token", flush=True)
    stamps = Stamps()
    generate("nanopali", models["nanopali"], inputs, min(args.tokens, 8) + 1, stamps, reencode=True)
    reencode = statistics.median(b - a for a, b in zip(stamps.times, stamps.times[1:]))

    floor = {"nanopali": bytes_per_token / bw, "transformers": bytes_per_token / bw, "nanopali-int8": int8_bytes / bw}
    agree, max_diff, span = int8_quality(models["nanopali"], models["nanopali-int8"], inputs, args.tokens)
    med = {impl: {k: statistics.median(v) for k, v in results[impl].items()} for impl in impls}
    values = {
        "load, s": ({i: load_s[i] for i in impls}, "{:.2f}"),
        "peak memory, GiB": (peak, "{:.2f}"),
        "vision tower + projector, s": ({i: med[i]["vision"] for i in impls}, "{:.3f}"),
        f"prefill, {image_tokens} image + {text_tokens} text tokens, s": ({i: med[i]["prefill"] for i in impls},
                                                                         "{:.3f}"),
        "decode, median ms per token": ({i: med[i]["decode"] * 1e3 for i in impls}, "{:.1f}"),
        "decode / bandwidth floor": ({i: med[i]["decode"] / floor[i] for i in impls}, "{:.2f}x"),
    }
    lines = ["| | nanopali | transformers | nanopali / transformers | nanopali int8 | int8 / transformers |",
             "|---|---|---|---|---|---|"]
    for name, (v, fmt) in values.items():
        ratio = "" if name.startswith("decode /") else f"{v['nanopali'] / v['transformers']:.2f}"
        ratio8 = "" if name.startswith("decode /") else f"{v['nanopali-int8'] / v['transformers']:.2f}"
        lines.append(f"| {name} | {fmt.format(v['nanopali'])} | {fmt.format(v['transformers'])} | {ratio} | "
                     f"{fmt.format(v['nanopali-int8'])} | {ratio8} |")
    table = "\n".join(lines)
    shown = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
    which = "tiny config" if args.tiny else spec.title.split(", ", 1)[1]
    capped = ((" (eager asked for: its SDPA path cannot soft-cap the scores)",
               "sdpa in the vision tower, lesson 11's soft-capped attention in the text model")
              if reference_attention(folder) else ("", "sdpa in both"))
    notes = (f"- checkpoint: `{shown}`, random weights, {which}, bfloat16, {checkpoint_gib:.2f} GiB; peak memory / "
             f"checkpoint: nanopali {peak['nanopali'] / checkpoint_gib:.2f}, transformers "
             f"{peak['transformers'] / checkpoint_gib:.2f}, nanopali int8 "
             f"{peak['nanopali-int8'] / checkpoint_gib:.2f}\n"
             f"- attention: transformers {reference}{capped[0]}; nanopali {capped[1]}\n"
             f"- bandwidth floor: the weights a decode step reads / the read speed measured in this run "
             f"({bw / 1e9:.1f} GB/s summing a {bw_size / 2**30:g} GiB tensor; copying one: {copy_bw / 1e9:.1f} GB/s): "
             f"bfloat16 {bytes_per_token / 1e9:.2f} GB = {floor['nanopali'] * 1e3:.0f} ms/token, int8 "
             f"{int8_bytes / 1e9:.2f} GB = {floor['nanopali-int8'] * 1e3:.0f} ms/token\n"
             f"- int8 against bfloat16 (nanopali, the same prompt and the {args.tokens} tokens bfloat16 generated, "
             f"teacher-forced): next-token agreement {agree:.1%}, largest logit difference {max_diff:.3f} (logits "
             f"span {span:.1f})\n"
             f"- re-encoding the image at every step, as the educational ports do: {reencode * 1e3:.0f} ms/token "
             f"(nanopali's decode with the vision tower run again each step), "
             f"{reencode / med['nanopali']['decode']:.1f}x the cached decode\n"
             f"- {args.repeats} runs of {args.tokens} decode steps each, the implementations in alternating order; "
             f"machine: {machine()}\n"
             f"- made by `python benchmarks/bench_3b.py --model {key}{' --tiny' if args.tiny else ''}` on "
             f"{time.strftime('%Y-%m-%d')}")
    section = f"## {spec.title}\n\n{table}\n\n{notes}\n"
    print("\n" + section, flush=True)
    return section


def earlier_sections(path: Path, header: str) -> dict[str, str]:
    """The sections of an earlier results file, by model key, when it was made on this CPU in the same mode (its
    title and CPU line are the header's); else none."""
    if not path.is_file() or not path.read_text().startswith(header):
        return {}
    titles = {f"## {spec.title}\n": key for key, spec in MODELS.items()}
    sections = {}
    for part in ("\n" + path.read_text()[len(header):]).split("\n## ")[1:]:
        part = "## " + part.rstrip("\n") + "\n"
        key = next((key for title, key in titles.items() if part.startswith(title)), None)
        if key:
            sections[key] = part
    return sections


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all", help="which model's shapes (default all)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs instead of the 3B shapes (a smoke test)")
    parser.add_argument("--weights", type=Path, default=REPO / "weights",
                        help="the folder that holds the random checkpoints (each written there once)")
    parser.add_argument("--checkpoint", type=Path, help="where one model's random checkpoint is (or is written)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=24, help="decode steps per run (at least 16 for the table)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results.md")
    args = parser.parse_args(argv)
    keys = list(MODELS) if args.model == "all" else [args.model]
    if args.checkpoint and len(keys) > 1:
        parser.error("--checkpoint names one model's folder: use it with --model, or use --weights for all")
    cpu = cpu_name()
    print(f"CPU: {cpu}", flush=True)
    if len(keys) > 1:  # each model in a fresh process: the first one's memory is surely gone when the next loads
        for key in keys:
            command = [sys.executable, __file__, "--model", key, "--repeats", str(args.repeats), "--tokens",
                       str(args.tokens), "--threads", str(args.threads), "--weights", str(args.weights), "--out",
                       str(args.out), *(["--tiny"] if args.tiny else [])]
            print(f"\n{MODELS[key].title}: {' '.join(command[1:])}", flush=True)
            if (code := subprocess.run(command).returncode) != 0:
                return code
        return 0
    torch.set_num_threads(args.threads)
    header = (f"# nanopali vs transformers{' (tiny smoke run)' if args.tiny else ''}\n\n"
              f"CPU: {cpu} (each table's notes give the whole machine)\n\n")
    sections = earlier_sections(args.out, header)  # a run of one model keeps the other's table (same CPU only)
    key = keys[0]
    spec = MODELS[key]
    sections[key] = bench_model(key, args.checkpoint or args.weights / (spec.tiny_folder if args.tiny else spec.folder),
                                args)
    kept = [other for other in sections if other != key]
    args.out.write_text(header + "\n".join(sections[k] for k in MODELS if k in sections))
    print(f"written to {args.out}" + (f" (kept the earlier table of {', '.join(kept)}: same CPU)" if kept else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
