"""Corpus readers: every format parsed, and every kind of bad input named in one line."""

import json

import pytest

from rgpt.data import CorpusError, corpus_texts, expand_paths, read_dialogues, read_pretrain


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def jsonl(*objs):
    return "\n".join(json.dumps(o, ensure_ascii=False) for o in objs) + "\n"


def test_json_array_of_strings(tmp_path):
    f = write(tmp_path / "p.json", json.dumps(["  第一篇文章。 ", "", "第二篇文章。"], ensure_ascii=False))
    assert list(read_pretrain([f])) == ["第一篇文章。", "第二篇文章。"]


def test_json_array_chat_strings_with_several_turns(tmp_path):
    chats = [
        "用户：你好！助手：你好，有什么事？",
        "用户: 画蛇添足什么意思？\n助手:多余。 用户：还有呢？助手：没有了。",
    ]
    f = write(tmp_path / "c.json", json.dumps(chats, ensure_ascii=False))
    assert list(read_dialogues([f])) == [
        [("user", "你好！"), ("assistant", "你好，有什么事？")],
        [
            ("user", "画蛇添足什么意思？"),
            ("assistant", "多余。"),
            ("user", "还有呢？"),
            ("assistant", "没有了。"),
        ],
    ]


def test_jsonl_text_and_conversations(tmp_path):
    p = write(
        tmp_path / "p.jsonl",
        jsonl({"text": "一篇文章。", "topic": "历史"}) + "\n  \n" + jsonl({"text": " 又一篇 "}),
    )
    assert list(read_pretrain([p])) == ["一篇文章。", "又一篇"]
    conv = {
        "conversations": [{"role": "user", "content": "问题？"}, {"role": "assistant", "content": " 回答。"}]
    }
    s = write(tmp_path / "s.jsonl", jsonl(conv))
    assert list(read_dialogues([s])) == [[("user", "问题？"), ("assistant", "回答。")]]
    assert list(corpus_texts([s], "sft")) == ["问题？", "回答。"]


def test_txt_one_document_per_line_with_bom_and_blank_lines(tmp_path):
    f = write(tmp_path / "t.txt", "\ufeff第一行。\r\n\r\n  第二行。  \n")
    assert list(read_pretrain([f])) == ["第一行。", "第二行。"]


def test_directories_expand_in_natural_order(tmp_path):
    for name in ("b/10.txt", "b/2.txt", "a.txt", "b/notes.md", "b/.hidden.txt"):
        write(tmp_path / "d" / name, f"{name}的内容\n")
    got = [p.relative_to(tmp_path / "d").as_posix() for p in expand_paths([str(tmp_path / "d")])]
    assert got == ["a.txt", "b/2.txt", "b/10.txt"]
    assert list(read_pretrain([str(tmp_path / "d")]))[-1] == "b/10.txt的内容"


def error_of(read, tmp_path, name, content) -> str:
    f = write(tmp_path / name, content)
    with pytest.raises(CorpusError) as e:
        list(read([f]))
    msg = str(e.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    assert name in msg, f"error message does not name the file {name}: {msg!r}"
    return msg


@pytest.mark.parametrize(
    "read, name, content, expect",
    [
        (read_pretrain, "bad.json", '["好的",\n  "坏的"\n  "缺逗号"]', "bad.json:3:3: malformed JSON"),
        (read_pretrain, "bad.jsonl", '{"text": "好"}\n{"text": 坏}\n', "bad.jsonl:2:10: malformed JSON"),
        (
            read_pretrain,
            "list.jsonl",
            '{"text": "好"}\n["不是对象"]\n',
            "list.jsonl:2: expected a JSON object, got list",
        ),
        (
            read_pretrain,
            "field.jsonl",
            '{"text": "好"}\n{"txt": "错字段"}\n',
            'field.jsonl:2: object has no string "text"',
        ),
        (read_pretrain, "obj.json", '{"text": "不是数组"}', "obj.json: expected a JSON array, got dict"),
        (read_pretrain, "num.json", '["好", 3]', "num.json: item 2: expected a string or an object, got int"),
        (
            read_pretrain,
            "latin1.txt",
            "第一行\n".encode() + "caf\xe9\n".encode("latin-1"),
            "latin1.txt:2: not valid UTF-8 at byte offset 13",
        ),
        (
            read_pretrain,
            "latin1.json",
            '[\n"好",\n"caf'.encode() + b'\xe9"]',
            "latin1.json:3: not valid UTF-8 at byte offset 13",
        ),
        (read_pretrain, "empty.txt", "\n  \n", "empty corpus: no documents in"),
        (read_pretrain, "doc.md", "# 标题", "unsupported corpus file type '.md'"),
        (
            read_dialogues,
            "noasst.jsonl",
            jsonl({"conversations": [{"role": "user", "content": "在吗？"}]}),
            "noasst.jsonl:1: dialogue has no assistant turn",
        ),
        (
            read_dialogues,
            "noasst.json",
            '["用户：在吗？"]',
            "noasst.json: item 1: dialogue has no assistant turn",
        ),
        (read_dialogues, "nomark.json", '["只是一句话"]', "no 用户：/助手： role markers"),
        (read_dialogues, "before.json", '["开头 用户：你好助手：好"]', "text before the first"),
        (read_dialogues, "emptyturn.json", '["用户：你好助手：  "]', "turn 2 (assistant) is empty"),
        (
            read_dialogues,
            "role.jsonl",
            jsonl({"conversations": [{"role": "system", "content": "规则"}]}),
            "turn 1 has role 'system'",
        ),
        (read_dialogues, "noconv.jsonl", jsonl({"dialog": []}), 'no "conversations" list'),
    ],
)
def test_bad_input_is_one_line_naming_file_and_place(tmp_path, read, name, content, expect):
    msg = error_of(read, tmp_path, name, content)
    assert expect in msg, f"expected {expect!r} in {msg!r}"


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.txt: no such file or directory"):
        list(read_pretrain([str(tmp_path / "nope.txt")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"empty: directory holds no"):
        list(read_pretrain([str(tmp_path / "empty")]))
    with pytest.raises(CorpusError, match="no files given"):
        list(read_pretrain([]))
