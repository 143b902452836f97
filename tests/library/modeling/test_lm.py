import torch

from sftpipe.data.tokenized import read_parquet
from sftpipe.modeling import lm
from sftpipe.modeling.models import load_causal_lm, load_tokenizer


def pack(rows):
    """One packed row from several tokenized rows: positions restart at 0 per sample."""
    return {
        "input_ids": [t for r in rows for t in r["input_ids"]],
        "labels": [t for r in rows for t in r["labels"]],
        "position_ids": [i for r in rows for i in range(len(r["input_ids"]))],
        "num_tokens": sum(r["num_tokens"] for r in rows),
        "num_loss_tokens": sum(r["num_loss_tokens"] for r in rows),
    }


def test_packed_rows_give_the_loss_and_gradient_of_separate_rows(tiny_model_dir, tokenized):
    model, pad = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir).pad_token_id
    assert lm.isolates_packed_samples(model, torch.device("cpu"))
    rows = read_parquet(tokenized[0])[:6]
    packed = [pack(rows[:4]), pack(rows[4:])]  # two bins of different lengths: one is padded
    batch = lm.collate(packed, pad)
    model_inputs = {"input_ids", "position_ids"}  # no mask: samples apart by position_ids
    assert set(batch) == model_inputs | {"labels", "loss_index", "loss_targets", "cu_seq_lens"}

    def loss_and_grads(batch):
        model.zero_grad()
        loss, count = lm.loss_sum(model, batch)
        loss.backward()
        return (
            float(loss.detach()),
            count,
            torch.cat([p.grad.flatten() for p in model.parameters()]),
        )

    packed_loss, packed_count, packed_grads = loss_and_grads(batch)
    plain_loss, plain_count, plain_grads = loss_and_grads(lm.collate(rows, pad))
    assert packed_count == plain_count == sum(r["num_loss_tokens"] for r in rows)
    assert abs(packed_loss - plain_loss) < 1e-3
    torch.testing.assert_close(packed_grads, plain_grads, atol=1e-5, rtol=1e-3)


def test_plain_rows_get_an_attention_mask_and_no_label_on_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = lm.collate(rows, pad_id=2)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_matmul_parameters_leave_out_an_untied_lookup_table(encoder):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    classifier = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2)
    total = sum(p.numel() for p in classifier.parameters())
    words = classifier.get_input_embeddings().weight.numel()
    assert lm.matmul_parameters(classifier) == total - words
    config = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    config |= dict(num_attention_heads=2, num_key_value_heads=2)
    for tied in (True, False):
        model = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=tied))
        total = sum(p.numel() for p in model.parameters())
        # Tied: the output projection is the embedding matrix, a matmul per token.
        assert lm.matmul_parameters(model) == (total if tied else total - 64 * 16)


def test_chunked_cross_entropy_gives_the_loss_and_gradients_of_one_pass(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(23, 8, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    whole = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    want = torch.autograd.grad(whole, (hidden, head.weight))
    # chunks of 4 rows (2 padded in the last): 6 chunks
    monkeypatch.setattr(lm, "SHAPE_ROWS", 4)
    monkeypatch.setattr(lm, "LOGITS_CHUNK_BYTES", 4 * 4 * 50)
    chunked = lm.chunked_cross_entropy(head, hidden, targets)
    torch.testing.assert_close(chunked, whole)
    got = torch.autograd.grad(chunked, (hidden, head.weight))
    for mine, expected in zip(got, want, strict=True):
        torch.testing.assert_close(mine, expected)
    with torch.no_grad():
        torch.testing.assert_close(lm.chunked_cross_entropy(head, hidden, targets), whole)
    empty = lm.chunked_cross_entropy(head, hidden[:0], targets[:0])
    assert empty.item() == 0.0 and empty.requires_grad


def test_chunked_cross_entropy_under_bf16_autocast_matches_the_plain_head(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    monkeypatch.setattr(lm, "SHAPE_ROWS", 3)
    monkeypatch.setattr(lm, "LOGITS_CHUNK_BYTES", 6 * 4 * 300)  # chunks of 6 rows, 2 padded
    results = []
    for loss_fn in (torch.nn.functional.cross_entropy, None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if loss_fn is None:
                loss = lm.chunked_cross_entropy(head, hidden, targets)
            else:
                loss = loss_fn(head(hidden).float(), targets, reduction="sum")
        results.append((loss, *torch.autograd.grad(loss / 40, (hidden, head.weight))))
    (plain, *plain_grads), (chunked, *chunked_grads) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=0)
    for got, want in zip(chunked_grads, plain_grads, strict=True):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
