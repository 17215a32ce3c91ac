"""Tokenizer: fixed special ids, round trips, idioms, character fallback, determinism, save/load."""

import pytest

from rgpt.data.tokenizer import (
    ASSISTANT_ID,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIALS,
    UNK_ID,
    USER_ID,
    Tokenizer,
    normalise,
    shipped_idioms,
)

# 熊猫吃竹 is no idiom and not in jieba's dictionary: it stays whole only if registration works.
IDIOMS = ("画蛇添足", "熊猫吃竹")
CORPUS = [
    "今天天气很好，我们去公园散步。",
    "我们今天学习了一个成语，叫画蛇添足。",
    "画蛇添足的意思是做了多余的事。",
    "熊猫吃竹的时候很安静，熊猫吃竹也很慢。",
    "Hello world! 我们用 Python 3.10 写代码，版本号是 v2。",
    "Hello world, 今天天气很好 :-) 100% 完成（括号）“引号”……",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.build(CORPUS, min_freq=2, max_size=1000, idioms=IDIOMS)


def pieces(tok, text):
    return [tok.decode([i]) for i in tok.encode(text)]


def test_special_ids_are_fixed(tok):
    assert SPECIALS == ("<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>")
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID) == (0, 1, 2, 3, 4, 5)
    assert tok.tokens[:6] == list(SPECIALS)


@pytest.mark.parametrize(
    "text",
    [
        "今天天气很好，我们去公园散步。",  # Chinese only
        "我们用 Python 3.10 写代码，Hello world!",  # mixed Chinese / Latin / digits
        "“引号”（括号）……100%:-)",  # punctuation, full and half width
        "熊猫今天很好，成语叫画蛇添足",  # a recombination never seen as a whole
    ],
)
def test_round_trip_on_vocabulary_characters(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_array(text).tolist() == tok.encode(text), "encode_array differs from encode"


def test_whitespace_is_normalised_and_no_spaces_are_inserted(tok):
    text = "  今天\t天气   很好\n\nHello   world  "
    assert normalise(text) == "今天 天气 很好 Hello world"
    assert tok.decode(tok.encode(text)) == "今天 天气 很好 Hello world"
    out = tok.decode(tok.encode("我们今天学习了一个成语"))
    assert out == "我们今天学习了一个成语", f"spaces inserted between Chinese words: {out!r}"


def test_registered_idioms_stay_single_tokens(tok):
    for idiom in IDIOMS:
        got = pieces(tok, f"他说这是{idiom}啊")
        assert idiom in got, f"{idiom} was cut into {got}"


def test_shipped_idioms_stay_single_tokens():
    shipped = shipped_idioms()
    well_known = [w for w in ("守株待兔", "画蛇添足", "亡羊补牢") if w in shipped]
    if not well_known:
        pytest.skip("rgpt/corpus/idioms.tsv is missing or lacks the well-known idioms")
    tok = Tokenizer.build([f"他讲了{w}的故事。{w}很有名。" for w in well_known], min_freq=2)
    for w in well_known:
        assert w in pieces(tok, f"我们都知道{w}的道理"), f"shipped idiom {w} not kept whole"


def test_unknown_words_fall_back_to_characters_and_unseen_characters_to_unk(tok):
    # 散步 occurs once (< min_freq): not a vocabulary word, but its characters are.
    assert "散步" not in tok.tokens
    assert pieces(tok, "散步") == ["散", "步"]
    assert tok.encode("龘") == [UNK_ID]
    assert tok.decode(tok.encode("天龘")) == "天<unk>"
    assert tok.unk_rate(["天龘"]) == pytest.approx(0.5)
    assert tok.unk_rate(CORPUS) == 0.0


def test_vocabulary_counts_and_caps():
    texts = ["我们", "我们", "我们", "你们", "你们", "他们"]  # 我们 x3, 你们 x2, 他们 x1
    tok = Tokenizer.build(texts, min_freq=2, max_size=100, idioms=())
    chars = ["们", "我", "你", "他"]  # by frequency 6, 3, 2, 1
    assert tok.tokens == [*SPECIALS, *chars, "我们", "你们"]
    capped = Tokenizer.build(texts, min_freq=1, max_size=len(SPECIALS) + len(chars) + 1, idioms=())
    assert capped.tokens[-1] == "我们", f"cap kept {capped.tokens[-1]!r} instead of the most frequent word"
    # ties (你们/他们 both x1 here) break by the word itself, never by input order
    tied = Tokenizer.build(["他们", "你们"], min_freq=1, idioms=())
    assert tied.tokens[-2:] == sorted(["他们", "你们"])


def test_every_vocabulary_word_is_emitted_on_the_build_corpus(tok):
    emitted = {i for text in CORPUS for i in tok.encode(text)}
    never = [t for i, t in enumerate(tok.tokens) if len(t) > 1 and i >= len(SPECIALS) and i not in emitted]
    assert not never, f"vocabulary words the encoder never emits: {never}"


def test_same_corpus_gives_identical_vocab_json(tmp_path):
    a = Tokenizer.build(CORPUS, min_freq=2, idioms=IDIOMS)
    b = Tokenizer.build(list(reversed(CORPUS)), min_freq=2, idioms=IDIOMS)
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_save_load_is_bit_exact(tok, tmp_path):
    tok.save(tmp_path)  # a directory: writes vocab.json inside it
    loaded = Tokenizer.load(tmp_path / "vocab.json")
    assert loaded.tokens == tok.tokens and loaded.fingerprint == tok.fingerprint
    assert (loaded.hmm, loaded.min_freq, loaded.user_words) == (False, 2, tuple(sorted(IDIOMS)))
    for text in CORPUS:
        assert loaded.encode(text) == tok.encode(text)
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "vocab.json").read_bytes()


def test_hmm_setting_is_kept():
    tok = Tokenizer.build(CORPUS, hmm=True, idioms=IDIOMS)
    assert tok.hmm and tok.to_dict()["settings"]["hmm"] is True
    assert tok.decode(tok.encode(CORPUS[0])) == CORPUS[0]


NUMBERS = ["25加38等于63。", "25加38等于63。", "2024年有12个月，2024年", "第３章，第３章"]


def test_split_digits_spells_every_number_digit_by_digit(tmp_path):
    words = Tokenizer.build(NUMBERS, idioms=())
    assert {"25", "63", "2024"} <= set(words.tokens)  # without it, frequent numbers are words
    tok = Tokenizer.build(NUMBERS, idioms=(), split_digits=True)
    assert [t for t in tok.tokens if len(t) > 1 and any(c.isdigit() for c in t)] == []
    pieces = [tok.tokens[i] for i in tok.encode("25加38等于63。2024年，第３章")]
    assert pieces == [*"25", "加", *"38", "等于", *"63", "。", *"2024", "年", "，", "第", "３", "章"]
    assert tok.decode(tok.encode(NUMBERS[2])) == NUMBERS[2]
    assert tok.to_dict()["settings"]["split_digits"] is True
    assert "split_digits" not in words.to_dict()["settings"]  # vocabularies from before keep their bytes
    tok.save(tmp_path / "v.json")
    loaded = Tokenizer.load(tmp_path / "v.json")
    assert loaded.split_digits and loaded.fingerprint == tok.fingerprint and not words.split_digits
    d = tok.to_dict()
    d["tokens"] = [*d["tokens"], "63"]
    with pytest.raises(ValueError, match="'63', a word with a digit"):
        Tokenizer.from_dict(d)


def test_special_strings_in_text_are_plain_characters(tok):
    ids = Tokenizer.build(["<eos> <user>"], min_freq=1, idioms=()).encode("<eos>")
    assert EOS_ID not in ids and len(ids) > 1


def test_dialogue_template_and_mask(tok):
    u1, a1, u2, a2 = "我们好", "今天天气很好", "画蛇添足", "多余"
    ids, mask = tok.encode_dialogue([("user", u1), ("assistant", a1), ("user", u2), ("assistant", a2)])
    e = tok.encode
    want = [
        BOS_ID,
        USER_ID,
        *e(u1),
        ASSISTANT_ID,
        *e(a1),
        EOS_ID,
        USER_ID,
        *e(u2),
        ASSISTANT_ID,
        *e(a2),
        EOS_ID,
    ]
    assert ids == want
    want_mask = (
        [False] * (2 + len(e(u1)) + 1)
        + [True] * (len(e(a1)) + 1)
        + [False] * (1 + len(e(u2)) + 1)
        + [True] * (len(e(a2)) + 1)
    )
    assert mask == want_mask
    assert tok.decode(ids) == u1 + a1 + u2 + a2
    assert (
        tok.decode(ids, skip_special=False)
        == f"<bos><user>{u1}<assistant>{a1}<eos><user>{u2}<assistant>{a2}<eos>"
    )


def test_prompt_ends_with_the_assistant_cue(tok):
    prompt = tok.encode_prompt([("user", "你好"), ("assistant", "好"), ("user", "天气")])
    assert prompt == tok.encode_dialogue([("user", "你好"), ("assistant", "好"), ("user", "天气")])[0] + [
        ASSISTANT_ID
    ]
    assert tok.encode_pretrain("天气") == [BOS_ID, *tok.encode("天气"), EOS_ID]
    with pytest.raises(ValueError, match="last turn"):
        tok.encode_prompt([("user", "你好"), ("assistant", "好")])
