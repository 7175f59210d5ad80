from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.fitting import Draft, Segment, TokenCounter, fit, within_tolerance

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "x", "the"]


def _units(data, n):
    return [" ".join(data.draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=60))) + ".\n" for _ in range(n)]


def _check(tokenizer, data, target):
    counter = TokenCounter(tokenizer)
    units = _units(data, data.draw(st.integers(1, 40)))
    needle = "The secret code is " + data.draw(st.sampled_from(["blue-7", "K9x", "omega"])) + "."
    ans = needle.index("code is ") + len("code is ")
    depth = data.draw(st.floats(0, 1))

    def arrange(k):
        segs = [Segment(u) for u in units[:k]]
        segs.insert(int(depth * k), Segment(needle + "\n", ((0, len(needle), "needle"), (ans, len(needle) - 1, "answer"))))
        return Draft("Read this.\n", segs, "Question: what is the code?\nAnswer:")

    fitted = fit(counter, arrange, len(units), target, "The grass is green. The sky is blue.",
                 unit_texts=units)
    assert fitted is not None
    assert counter.count(fitted.prompt) == fitted.n_tokens  # the recorded count is exact
    assert within_tolerance(fitted.n_tokens, target), (fitted.n_tokens, target)
    (s, e), = fitted.spans["needle"]
    assert fitted.prompt[s:e] == needle
    (s, e), = fitted.spans["answer"]
    assert fitted.prompt[s:e] == needle[ans:-1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), target=st.integers(200, 3000))
def test_fit_char_tokenizer(char_tok, data, target):
    _check(char_tok, data, target)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), target=st.integers(150, 3000))
def test_fit_bpe_tokenizer(bpe_tokenizer, data, target):
    _check(bpe_tokenizer, data, target)


def test_fit_returns_none_when_mandatory_text_too_long(char_tok):
    counter = TokenCounter(char_tok)
    assert fit(counter, lambda k: Draft("x" * 500, [], ""), 0, 100, "a b") is None


def test_single_unit_larger_than_tolerance_is_filled_with_filler(char_tok):
    counter = TokenCounter(char_tok)
    units = ["y" * 150 + "\n"] * 10  # each unit is far more than 2% of the target

    fitted = fit(counter, lambda k: Draft("", [Segment(u) for u in units[:k]], "?"), 10, 400, "grass is green",
                 unit_texts=units)
    assert fitted.n_units == 2 and fitted.n_filler_words > 0
    assert within_tolerance(fitted.n_tokens, 400) and len(fitted.prompt) == fitted.n_tokens


def test_counts_ignore_a_saved_truncation_setting(char_tok):
    import copy

    tok = copy.deepcopy(char_tok)
    tok.backend_tokenizer.enable_truncation(max_length=100)
    counter = TokenCounter(tok)
    assert counter.count("x" * 500) == 500 and counter.counts(["y" * 300]) == [300]
    assert tok.backend_tokenizer.truncation is not None  # the caller's tokenizer is left as it was
