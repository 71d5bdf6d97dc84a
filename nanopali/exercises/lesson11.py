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
    got = uncap(soft_cap(small, 50.0), 50.0)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32, (
        f"a float32 input gave {getattr(got, 'dtype', type(got).__name__)}: keep y's dtype")
    assert torch.allclose(got, small, atol=1e-4), (
        f"cap 50, float32: uncap(soft_cap(x)) gave {[round(v, 4) for v in got.tolist()]} for x = {small.tolist()}")
    # what float32 leaves of large logits: from about 9 times the cap (270 for 30), tanh rounds to exactly 1
    logits = torch.arange(300.0, 1001.0)  # 701 different logits, 10 to 33 times the cap of 30
    flat = int((soft_cap(logits, 30.0) == 30.0).sum())
    return (f"uncap undoes soft_cap for caps 50, 30 and 5, in float64 and float32. In float32, {flat} of the "
            f"{logits.numel()} whole logits from 300 to 1000 come out of soft_cap(x, 30) as exactly 30.0: far enough "
            "past the cap, capping forgets which logit was larger, and no uncap can tell them apart")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _parameter_hint(config, got: int, expected: int) -> str:
    "What a count that is off by this much most likely forgot or doubled ('' when nothing fits)."
    D, L, H, d = config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim
    if got - expected == config.vocab_size * D:
        return ": the head is tied to the embedding table, count the table once"
    if expected - got in (L * D, 2 * L * D, 3 * L * D):
        return ": each layer has four norms of hidden_size (before and after attention, before and after the MLP)"
    if expected - got == D:
        return ": the final norm has hidden_size parameters too"
    if got - expected == 2 * L * D * (D - H * d):  # q_proj and o_proj counted as hidden_size x hidden_size
        return (": q_proj has num_attention_heads * head_dim outputs (o_proj as many inputs), which need not be "
                f"hidden_size: here {H} x {d} = {H * d}, against {D}")
    if D % H == 0 and got - expected == 2 * L * D * (H + config.num_key_value_heads) * (D // H - d):
        return f": head_dim is the config's {d}, not hidden_size // num_attention_heads = {D // H}"
    return ""


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
        assert got == expected, f"{name}: {got:,}, expected {expected:,}{_parameter_hint(config, got, expected)}"
        found[name] = got
    return (f"3B text model {found['3b']:,}, 10B {found['10b']:,}, 28B {found['28b']:,}, and two small configs, "
            "equal to the models built on the meta device")


def _gemma2_masks(token_type_ids, attention_mask, window):
    "What Gemma2Model.attention_mask gives its sliding layers, for all T queries."
    return sliding_window_mask(prefix_lm_mask(token_type_ids, attention_mask), token_type_ids, window)


def _kind(types, mask, b, k) -> str:
    "How the rules see token k of row b: 'prefix' or 'text', and whether it is padding."
    return ("prefix" if types[b, k] == 0 else "text") + (", padding" if mask[b, k] == 0 else "")


def _where(i, j) -> str:
    "Where key j is, seen from query i."
    return "itself" if i == j else (f"{i - j} back" if j < i else f"{j - i} ahead")


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
                raise AssertionError(
                    f"T={T}, window={window}, row {b} (types {types[b].tolist()}, attention_mask {mask[b].tolist()}): "
                    f"query {i} ({_kind(types, mask, b, i)}), key {j} ({_kind(types, mask, b, j)}, {_where(i, j)}) "
                    f"is {bool(got[b, i, j])}, expected {bool(expected[b, i, j])}")
            cases += 1
    return f"equal to Gemma2Model's sliding mask on {cases} random batches (lengths 1-9, windows 1-20, padding)"
