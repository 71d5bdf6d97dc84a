"""The command line: `python -m nanopali --image PATH`.

Hand-written (no notebook exports it). It runs whatever the course has built so
far on a photo and says what it did. Today that is lessons 01 and 02: the photo
becomes pixel values, patches, patch embeddings and SigLIP image features, at the
real model's shapes but with random weights. When the whole model exists, this
becomes the "ask anything about this image" demo.
"""

import argparse
import sys
import time

# the sizes PaliGemma ships: 224, 448 and 896 pixel images
SIZES = (224, 448, 896)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nanopali",
        description="Run what nanopali has built so far on an image: today, lesson 01's preprocessing and "
                    "patch embeddings and lesson 02's SigLIP vision tower, at the shapes of the real PaliGemma "
                    "(random weights: the trained model arrives with lesson 08).",
    )
    parser.add_argument("--image", required=True, help="path of an image file (jpg, png, ...), e.g. images/chelsea.png")
    parser.add_argument("--size", type=int, default=224, choices=SIZES, help="model image size in pixels (default 224)")
    return parser


def random_tower(config, seed: int = 0):
    "The real-size SigLIP tower in bfloat16 with random weights, built without a float32 copy."
    import torch

    from .siglip import SiglipVisionModel

    with torch.device("meta"):
        tower = SiglipVisionModel(config)
    tower = tower.to_empty(device="cpu").to(torch.bfloat16).eval()  # memory, not yet values
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return tower


def run(image_path: str, size: int) -> None:
    import torch

    from .patches import SiglipVisionConfig, load_image, patchify, preprocess_images

    start = time.perf_counter()
    image = load_image(image_path)
    print(f"image:       {image_path}: {image.width} x {image.height} pixels, mode {image.mode}")

    pixel_values = preprocess_images([image], size=size)
    lo, hi = pixel_values.min().item(), pixel_values.max().item()
    print(f"pixels:      {tuple(pixel_values.shape)} float32 in [{lo:.2f}, {hi:.2f}] "
          f"(RGB, bicubic resize to {size} x {size}, rescaled to [0, 1], normalised to [-1, 1])")

    config = SiglipVisionConfig.so400m(image_size=size)
    patches = patchify(pixel_values, config.patch_size)
    print(f"patches:     {config.grid_size} x {config.grid_size} grid of {config.patch_size} x {config.patch_size} "
          f"patches -> {tuple(patches.shape)}")

    built = time.perf_counter()
    tower = random_tower(config)
    encoding = time.perf_counter()
    with torch.inference_mode():
        embeddings = tower.embeddings(pixel_values.to(torch.bfloat16))
        features = tower(pixel_values.to(torch.bfloat16))
    n_embed = sum(p.numel() for p in tower.embeddings.parameters())
    n_params = sum(p.numel() for p in tower.parameters())
    print(f"embeddings:  {tuple(embeddings.shape)} from SiglipVisionEmbeddings ({n_embed:,} parameters)")
    print(f"features:    {tuple(features.shape)} from SiglipVisionModel, {len(tower.encoder.layers)} layers, "
          f"{n_params:,} parameters in bfloat16 (built in {encoding - built:.1f} s, "
          f"encoded in {time.perf_counter() - encoding:.2f} s)")
    print("             (random weights: the numbers mean nothing yet, the shapes are the real model's)")
    print(f"image tokens the language model would see: {config.num_patches}")
    print(f"done in {time.perf_counter() - start:.1f} s. The lessons that build the rest: jupyter lab notebooks/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .patches import ImageFileError

    try:
        run(args.image, args.size)
    except (FileNotFoundError, ImageFileError) as e:
        print(f"nanopali: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
