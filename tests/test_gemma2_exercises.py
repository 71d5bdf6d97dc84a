"""Lesson 11's exercises: their checks accept a right answer and refuse the typical wrong ones, saying why.

The worked solutions (notebooks/solutions/11_paligemma2.ipynb) run under nbval; here, answers written to be
wrong in one way each."""

import torch

from nanopali.exercises.lesson11 import check_gemma2_parameters, check_sliding_mask_by_rules, check_uncap

# ---------------------------------------------------------------- 11.1: undo the cap


def test_exercise_11_1_accepts_cap_times_atanh_and_says_float32_flattens_large_logits(capsys):
    assert check_uncap(lambda y, cap: cap * torch.atanh(y / cap))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 11.1: correct")
    assert "701 of the 701 whole logits from 300 to 1000" in out  # every one of them capped to exactly 30.0


def test_exercise_11_1_refuses_atanh_without_the_cap_and_names_the_formula(capsys):
    assert not check_uncap(lambda y, cap: torch.atanh(y / cap))  # x / cap, not x
    assert "cap * atanh(y / cap) undoes it" in capsys.readouterr().out


def test_exercise_11_1_refuses_an_answer_in_another_dtype_than_its_input(capsys):
    assert not check_uncap(lambda y, cap: cap * torch.atanh(y.float() / cap))  # float64 in, float32 out
    assert "a float64 input gave torch.float32: keep y's dtype" in capsys.readouterr().out
    assert not check_uncap(lambda y, cap: cap * torch.atanh(y.double() / cap))  # float32 in, float64 out
    assert "a float32 input gave torch.float64: keep y's dtype" in capsys.readouterr().out


# ---------------------------------------------------------------- 11.2: Gemma 2's parameters, by formula


def _parameters(config, *, head_twice=False, norms_per_layer=4, final_norm=True, square_q=False,
                head_dim_from_width=False):
    "Gemma2ForCausalLM's parameter count, right by default; each keyword makes one typical mistake."
    D, L, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    d = D // config.num_attention_heads if head_dim_from_width else config.head_dim
    q_width = D if square_q else config.num_attention_heads * d
    kv_width = config.num_key_value_heads * d
    layer = 2 * D * q_width + 2 * D * kv_width + 3 * D * inner + norms_per_layer * D
    embedding = config.vocab_size * D * (2 if head_twice else 1)
    return embedding + L * layer + (D if final_norm else 0)


def test_exercise_11_2_accepts_the_count_of_the_models_built_on_meta(capsys):
    assert check_gemma2_parameters(_parameters)
    assert "3B text model 2,617,143,552" in capsys.readouterr().out


def test_exercise_11_2_refuses_a_head_counted_apart_from_the_tied_table(capsys):
    assert not check_gemma2_parameters(lambda config: _parameters(config, head_twice=True))
    assert "tied to the embedding table, count the table once" in capsys.readouterr().out


def test_exercise_11_2_refuses_two_norms_per_layer_and_a_forgotten_final_norm(capsys):
    assert not check_gemma2_parameters(lambda config: _parameters(config, norms_per_layer=2))  # Gemma 1's layer
    assert "each layer has four norms" in capsys.readouterr().out
    assert not check_gemma2_parameters(lambda config: _parameters(config, final_norm=False))
    assert "the final norm has hidden_size parameters too" in capsys.readouterr().out


def test_exercise_11_2_refuses_a_query_projection_as_wide_as_the_model(capsys):
    assert not check_gemma2_parameters(lambda config: _parameters(config, square_q=True))
    out = capsys.readouterr().out
    assert "3b:" in out and "q_proj has num_attention_heads * head_dim outputs" in out and "8 x 256 = 2048" in out


def test_exercise_11_2_refuses_a_square_query_projection_where_only_the_odd_config_tells(capsys):
    "The three sizes and tiny() all fail or pass with the rest; a count right everywhere else must still fail on 'odd'."
    def right_but_odd(config):
        return _parameters(config, square_q=config.hidden_size == 48)

    assert not check_gemma2_parameters(right_but_odd)
    out = capsys.readouterr().out
    assert "odd:" in out and "6 x 10 = 60, against 48" in out


def test_exercise_11_2_refuses_head_dim_taken_from_the_width(capsys):
    assert not check_gemma2_parameters(lambda config: _parameters(config, head_dim_from_width=True))
    assert "head_dim is the config's 256, not hidden_size // num_attention_heads = 288" in capsys.readouterr().out


def test_exercise_11_2_refuses_a_float_count(capsys):
    assert not check_gemma2_parameters(lambda config: float(_parameters(config)))
    assert "return a whole number (int)" in capsys.readouterr().out


# ---------------------------------------------------------------- 11.3: the sliding layer's mask, from its rules


def _by_rules(token_type_ids, attention_mask, window, *, prefix_exempt=True, window_inclusive=False,
              hide_padding=True, sees_itself=True, exempt_prefix_keys_only=False):
    "The three rules of 11.3 with loops, right by default; each keyword breaks one of them."
    B, T = token_type_ids.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        prefix = (token_type_ids[b] == 0).tolist()
        real = (attention_mask[b] == 1).tolist()
        for i in range(T):
            for j in range(T):
                visible = real[j] or not hide_padding or (sees_itself and j == i)
                in_order = j <= i or prefix[j]
                near = i - j <= window if window_inclusive else i - j < window
                both_prefix = prefix[j] if exempt_prefix_keys_only else prefix[i] and prefix[j]
                mask[b, i, j] = visible and in_order and (near or (prefix_exempt and both_prefix))
    return mask


def test_exercise_11_3_accepts_the_three_rules(capsys):
    assert check_sliding_mask_by_rules(_by_rules)
    assert "equal to Gemma2Model's sliding mask on 15 random batches" in capsys.readouterr().out


def test_exercise_11_3_refuses_a_window_that_binds_the_prefix_too(capsys):
    assert not check_sliding_mask_by_rules(lambda t, m, w: _by_rules(t, m, w, prefix_exempt=False))
    out = capsys.readouterr().out
    assert "(prefix), key" in out and "is False, expected True" in out  # a prefix query and a prefix key, too far


def test_exercise_11_3_refuses_a_window_one_token_too_wide(capsys):
    assert not check_sliding_mask_by_rules(lambda t, m, w: _by_rules(t, m, w, window_inclusive=True))
    out = capsys.readouterr().out
    assert "window=1" in out and "1 back) is True, expected False" in out  # a window of 1: each token sees itself only


def test_exercise_11_3_refuses_an_exemption_for_prefix_keys_seen_from_the_text(capsys):
    assert not check_sliding_mask_by_rules(lambda t, m, w: _by_rules(t, m, w, exempt_prefix_keys_only=True))
    out = capsys.readouterr().out
    assert "(text), key" in out and "(prefix, " in out and "is True, expected False" in out


def test_exercise_11_3_refuses_visible_padding_and_names_the_row(capsys):
    assert not check_sliding_mask_by_rules(lambda t, m, w: _by_rules(t, m, w, hide_padding=False))
    assert "(prefix, padding, 1 ahead) is True, expected False" in capsys.readouterr().out


def test_exercise_11_3_refuses_a_padding_token_that_does_not_see_itself(capsys):
    assert not check_sliding_mask_by_rules(lambda t, m, w: _by_rules(t, m, w, sees_itself=False))
    assert "padding, itself) is False, expected True" in capsys.readouterr().out


def test_exercise_11_3_refuses_a_mask_of_the_wrong_shape(capsys):
    assert not check_sliding_mask_by_rules(lambda t, m, w: _by_rules(t, m, w)[0])
    assert "expected (3, 1, 1)" in capsys.readouterr().out
