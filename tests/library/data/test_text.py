from sftpipe.data.text import normalize


def test_nfkc_and_invisible_characters():
    assert normalize("ｆｕｌｌ\u200bwidth\ufeff") == "fullwidth"
    assert normalize("a\x00b\x07c\ue000d") == "abcd"


def test_whitespace_collapsed_but_indentation_kept():
    text = "Here:\r\n\r\n\r\n\r\ndef f():\n    return   1   \n\t\tx  =  2"
    assert normalize(text) == "Here:\n\ndef f():\n    return 1\n\t\tx = 2"


def test_chinese_punctuation_stays_full_width_and_latin_goes_ascii():
    assert normalize("  你好，　世界！  ") == "你好，世界！"
    assert normalize("你好!有什么可以帮你?") == "你好！有什么可以帮你？"  # same as full-width input
    assert normalize("我用Python(一种语言)写代码 , 很好") == "我用Python（一种语言）写代码，很好"
    assert normalize("Ｈｅｌｌｏ，ｗｏｒｌｄ！ at 3:00") == "Hello,world! at 3:00"


def test_mojibake_is_repaired():
    assert (
        normalize("The Mona Lisa doesnâ€™t have eyebrows.")
        == "The Mona Lisa doesn’t have eyebrows."
    )
    assert normalize("æ—¥æœ¬èªž") == "日本語"
    assert normalize("naïve café") == "naïve café"  # correct Latin-1 text is left alone


def test_html_removed_outside_code():
    assert normalize("<p>Hello&nbsp;<b>world</b></p><p>x &amp; y</p>") == "Hello world\nx & y"
    kept = "Use `<div>&amp;</div>` or\n```html\n<p>hi</p>\n```"
    assert normalize(kept) == kept
    assert normalize("a <script>alert(1)</script>b<br>c") == "a b\nc"
    assert normalize("<b>x</b>", strip_html=False) == "<b>x</b>"
    assert normalize("List<T> and <EMAIL>") == "List<T> and <EMAIL>"


def test_blank_is_empty():
    assert normalize(" \n\t \u200b ") == ""
