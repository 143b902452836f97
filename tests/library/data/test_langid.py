from sftpipe.data import langid


def test_scripts_and_english():
    assert langid.detect("The cat sat on the mat, and it was happy.") == "en"
    assert langid.detect("Le chat est sur le tapis, très content.") == "latin"
    assert langid.detect("Él está aquí y ¿qué pasó? Ñandú.") == "latin"
    assert langid.detect("今天天气很好，我们去公园吧。") == "zh"
    assert langid.detect("今日は天気がいいですね。") == "ja"
    assert langid.detect("오늘 날씨가 좋네요") == "ko"
    assert langid.detect("Привет, как дела?") == "cyrillic"
    assert langid.detect("مرحبا كيف حالك") == "arabic"
    assert langid.detect("12345 !!! ...") == "other"
    assert langid.detect("") == "other"


def test_ascii_fast_path_finds_the_same_words_as_the_regex():
    # Words are runs of a-z after lowering: digits, underscores and punctuation break them.
    text = "The_end, and2the x-ray: you're WITH them!" * 3
    ascii_words = text.encode().lower().translate(langid._ASCII_WORD_BREAKS).split()
    assert [w.decode() for w in ascii_words] == langid._WORD.findall(text.lower())
    assert langid._script_counts("abc été 你好") == {
        "zh": 2,
        "kana": 0,
        "ko": 0,
        "latin": 6,
        "cyrillic": 0,
        "arabic": 0,
    }
