"Shared paths and helpers for the tests."

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
NOTEBOOKS = REPO / "notebooks"
SHIPPED = REPO / "weights" / "nanopali-shapes"  # the small model lesson 08 trained


def run_python(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    "Run `python <args>` with this interpreter; capture its output."
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def photos() -> list[Path]:
    "Every photo shipped in images/."
    return sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def reference_gemma_config(cfg, attn_implementation: str = "eager"):
    """transformers' GemmaConfig with the same settings as our GemmaConfig cfg (for the parity tests); for lesson 11's
    Gemma2Config, transformers' Gemma2Config with its five settings too."""
    import transformers

    settings = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id, bos_token_id=cfg.bos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attn_implementation=attn_implementation)
    if not hasattr(cfg, "query_pre_attn_scalar"):
        return transformers.GemmaConfig(**settings)
    return transformers.Gemma2Config(
        **settings, query_pre_attn_scalar=cfg.query_pre_attn_scalar, attn_logit_softcapping=cfg.attn_logit_softcapping,
        final_logit_softcapping=cfg.final_logit_softcapping, sliding_window=cfg.sliding_window,
        layer_types=cfg.layer_types)
