"""The command line: `python -m nanopali --image PATH`.

Hand-written (no notebook exports it). It runs whatever the course has built so
far on a photo and says what it did. Today that is lesson 01: the photo becomes
pixel values, patches and patch embeddings at the real model's shapes. When the
whole model exists, this becomes the "ask anything about this image" demo.
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
                    "SigLIP patch embeddings at the shapes of the real PaliGemma (random weights: the trained "
                    "model arrives with lesson 08).",
    )
    parser.add_argument("--image", required=True, help="path of an image file (jpg, png, ...), e.g. images/chelsea.png")
    parser.add_argument("--size", type=int, default=224, choices=SIZES, help="model image size in pixels (default 224)")
    return parser


def run(image_path: str, size: int) -> None:
    import torch

    from .patches import SiglipVisionConfig, SiglipVisionEmbeddings, load_image, patchify, preprocess_images

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

    torch.manual_seed(0)
    embeddings_layer = SiglipVisionEmbeddings(config).eval()
    with torch.no_grad():
        embeddings = embeddings_layer(pixel_values)
    n_params = sum(p.numel() for p in embeddings_layer.parameters())
    print(f"embeddings:  {tuple(embeddings.shape)} from SiglipVisionEmbeddings "
          f"(So400m/14 shapes, {n_params:,} random parameters)")
    print(f"image tokens the language model would see: {config.num_patches}")
    print(f"done in {time.perf_counter() - start:.2f} s. Next: lesson 02, the SigLIP encoder (jupyter lab notebooks/)")


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
