from sftpipe.text import normalize


def test_nfkc_and_invisible_characters():
    assert normalize("ｆｕｌｌ\u200bwidth\ufeff") == "fullwidth"
    assert normalize("a\x00b\x07c") == "abc"


def test_whitespace_collapsed_but_indentation_kept():
    text = "Here:\r\n\r\n\r\n\r\ndef f():\n    return   1   \n\t\tx  =  2"
    assert normalize(text) == "Here:\n\ndef f():\n    return 1\n\t\tx = 2"


def test_chinese_is_not_split_or_spaced():
    assert normalize("  你好，　世界！  ") == "你好, 世界!"


def test_blank_is_empty():
    assert normalize(" \n\t \u200b ") == ""
