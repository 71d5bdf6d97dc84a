"""Checks for lesson 11's exercises (notebooks/11_paligemma2.ipynb). Hand-written; solutions in
notebooks/solutions/11_paligemma2.ipynb."""

import torch

from nanopali.bridge import prefix_lm_mask
from nanopali.gemma2 import Gemma2Config, Gemma2ForCausalLM, sliding_window_mask, soft_cap

from . import exercise


@exercise("11.1")
def check_uncap(uncap) -> str:
    x = torch.linspace(-120.0, 120.0, 241, dtype=torch.float64)[None].repeat(2, 1)  # (2, 241), far beyond the cap
    for cap in (50.0, 30.0, 5.0):
        y = soft_cap(x, cap)
        inside = y.abs() < cap * (1 - 1e-9)  # in float64 tanh reaches 1 only far out; keep the invertible part
        got = uncap(y[inside], cap)
        assert isinstance(got, torch.Tensor) and got.shape == y[inside].shape, (
            f"cap {cap:g}: got shape {tuple(getattr(got, 'shape', ()))}, expected {tuple(y[inside].shape)}")
        assert got.dtype == torch.float64, f"a float64 input gave {got.dtype}: keep y's dtype"
        error = (got - x[inside]).abs().max().item()
        assert error < 1e-6 * cap, (
            f"cap {cap:g}: uncap(soft_cap(x)) is up to {error:.3g} away from x: cap * atanh(y / cap) undoes it")
    small = torch.tensor([0.5, -3.0, 20.0])
    assert torch.allclose(uncap(soft_cap(small, 50.0), 50.0), small, atol=1e-4), "float32 values near 0 come back"
    # in float32, what the cap leaves of large logits: how many of 100, 101, ..., 200 stay distinct after capping at 30
    logits = torch.arange(100.0, 201.0)
    distinct = soft_cap(logits, 30.0).unique().numel()
    return (f"uncap undoes soft_cap for caps 50, 30 and 5. In float32, the 101 logits 100, 101, ..., 200 capped at 30 "
            f"give only {distinct} distinct number(s): beyond a few times the cap, capping forgets which was larger")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@exercise("11.2")
def check_gemma2_parameters(gemma2_parameters) -> str:
    configs = {size: Gemma2Config.paligemma2(size) for size in ("3b", "10b", "28b")}
    configs["tiny"] = Gemma2Config.tiny()
    configs["odd"] = Gemma2Config.tiny(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=10,
                                       intermediate_size=80, num_hidden_layers=3)
    found = {}
    for name, config in configs.items():
        with torch.device("meta"):
            expected = _count(Gemma2ForCausalLM(config))
        got = gemma2_parameters(config)
        assert isinstance(got, int) and not isinstance(got, bool), f"return a whole number (int), got {got!r}"
        if got != expected:
            D, L = config.hidden_size, config.num_hidden_layers
            hint = ""
            if got - expected == config.vocab_size * D:
                hint = ": the head is tied to the embedding, count the table once"
            elif (expected - got) % (L * D) == 0 and (expected - got) // (L * D) in (1, 2):
                hint = ": each layer has four norms (and the final norm is one more)"
            elif got == expected - D:
                hint = ": the final norm has hidden_size parameters too"
            assert False, f"{name}: {got:,}, expected {expected:,}{hint}"
        found[name] = got
    return (f"3B text model {found['3b']:,}, 10B {found['10b']:,}, 28B {found['28b']:,}, and two small configs, "
            "equal to the models built on the meta device")


def _gemma2_masks(token_type_ids, attention_mask, window):
    "What Gemma2Model.attention_mask gives its sliding layers, for all T queries."
    return sliding_window_mask(prefix_lm_mask(token_type_ids, attention_mask), token_type_ids, window)


@exercise("11.3")
def check_sliding_mask_by_rules(sliding_mask_by_rules) -> str:
    generator = torch.Generator().manual_seed(0)
    cases = 0
    for T in (1, 5, 9):
        for window in (1, 2, 3, 5, 20):
            B = 3
            prefix_lengths = torch.randint(1, T + 1, (B,), generator=generator)
            pads = torch.randint(0, T, (B,), generator=generator).minimum(prefix_lengths - 1)
            positions = torch.arange(T)[None]
            types = (positions >= prefix_lengths[:, None]).long()  # 0 for the prefix, then 1
            mask = (positions >= pads[:, None]).long()  # left padding inside the prefix
            expected = _gemma2_masks(types, mask, window)
            got = sliding_mask_by_rules(types, mask, window)
            assert isinstance(got, torch.Tensor) and tuple(got.shape) == (B, T, T), (
                f"T={T}: got shape {tuple(getattr(got, 'shape', ()))}, expected {(B, T, T)}")
            got = got.bool()
            if not torch.equal(got, expected):
                b, i, j = (got != expected).nonzero()[0].tolist()
                assert False, (f"T={T}, window={window}, row {b} (types {types[b].tolist()}, attention_mask "
                               f"{mask[b].tolist()}): query {i}, key {j} is {bool(got[b, i, j])}, expected "
                               f"{bool(expected[b, i, j])}")
            cases += 1
    return f"equal to Gemma2Model's sliding mask on {cases} random batches (lengths 1-9, windows 1-20, padding)"
