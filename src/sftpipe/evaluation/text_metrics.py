"""Text similarity of generated answers to references: corpus BLEU and chrF (sacrebleu) and
mean ROUGE-L F1, all on a 0-100 scale, for any script (CJK characters count one by one)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORDS = re.compile(rf"[{_CJK}]|[^\W_]+")
_HAS_CJK = re.compile(rf"[{_CJK}]")


class _UnicodeWords:
    """ROUGE tokenizer for any script: lowercased words, CJK characters one by one (the
    default rouge-score tokenizer keeps only [a-z0-9] and scores Chinese as empty)."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu) and mean ROUGE-L F1, all on a 0-100 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps, refs = list(hypotheses), list(references)
    tokenize = "zh" if any(_HAS_CJK.search(r) for r in refs) else "13a"
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)]
    return {
        "rouge_l": 100.0 * sum(rouge) / max(len(rouge), 1),
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "bleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score,
    }
