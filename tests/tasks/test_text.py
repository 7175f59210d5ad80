import pytest

from tasks.text import best_f1_em, citation_f1, exact_match, find_all, locate_answers, normalize_answer, token_f1


def test_normalize_drops_case_punctuation_articles():
    assert normalize_answer("The  U.S.A.!") == "usa"
    assert normalize_answer("An apple, a pear") == "apple pear"


def test_token_f1_hand_computed():
    # pred tokens: eiffel tower in paris (4); gold: eiffel tower (2); overlap 2 -> P=.5 R=1 F1=2/3
    assert token_f1("the Eiffel Tower in Paris", "Eiffel tower") == pytest.approx(2 / 3)
    # pred: john smith; gold: smith john jr -> overlap 2, P=1, R=2/3, F1=0.8
    assert token_f1("John Smith", "Smith, John Jr.") == pytest.approx(0.8)
    assert token_f1("cat", "dog") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert token_f1("a", "the") == 1.0  # both normalize to empty (SQuAD)


def test_best_over_aliases_and_punctuation():
    assert best_f1_em("Dr. A. Moreau-Smith", ["Anne Moreau-Smith", "Dr. A. Moreau-Smith"]) == {"f1": 1.0, "em": 1.0}
    r = best_f1_em("Olsen", ["Mara K. Olsen", "Olsen"])
    assert r == {"f1": 1.0, "em": 1.0}
    assert exact_match("U.S.A.", "usa") == 1.0


def test_citation_f1():
    assert citation_f1("[3][7]", "[3][7]") == 1.0
    assert citation_f1("[7][3]", "[3][7]") == 1.0
    assert citation_f1("[3]", "[3][7]") == pytest.approx(2 / 3)  # P=1 R=.5
    assert citation_f1("[1][2][3]", "[3][7]") == pytest.approx(0.4)  # P=1/3 R=1/2
    assert citation_f1("none", "[3][7]") == 0.0


def test_find_all_respects_word_boundaries():
    assert find_all("in 19012 and 1901.", "1901") == [(13, 17)]
    assert find_all("U.S.A. and u.s.a.", "U.S.A.", ignore_case=True) == [(0, 6), (11, 17)]
    assert locate_answers("Born in PARIS.", ["London", "Paris"]) == [(8, 13)]
