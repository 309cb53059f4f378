"""The embedded LM workload: corpus, tokens, model shapes and causality, determinism, the
shipped weights against the unigram baseline."""

import pytest
import torch
from torch import nn

import hesse
from hesse.data import LMWorkload, Workload, lm_workload
from hesse.data.lm import (
    VOCAB,
    CausalTransformer,
    LMConfig,
    decode,
    encode,
    lm_corpus,
    lm_loss,
    lm_sequences,
    load_lm_weights,
    save_lm_weights,
    train_lm,
    unigram_loss,
)

TINY = LMConfig(d_model=16, n_layers=2, n_heads=2, context=12)


def tiny_data(n=24):
    return lm_sequences(lm_corpus("train")[: n * TINY.context + 1], TINY.context)


def test_tokens_round_trip_and_vocabulary():
    assert len(VOCAB) == 96 and VOCAB[0] == "\n"
    text = 'def f(x):\n    """Return ~x."""'
    assert decode(encode(text)) == text
    with pytest.raises(ValueError, match="not in the LM vocabulary"):
        encode("a\tb")
    for split in ("train", "test"):
        text = lm_corpus(split)
        assert set(text) <= set(VOCAB)
    with pytest.raises(ValueError, match="split"):
        lm_corpus("valid")


def test_sequences_are_shifted_windows():
    text = lm_corpus("test")[:100]
    X, y = lm_sequences(text, 8)
    assert X.shape == y.shape == ((100 - 1) // 8, 8)
    flat = encode(text)
    assert torch.equal(X.reshape(-1), flat[: X.numel()])
    assert torch.equal(y.reshape(-1), flat[1 : X.numel() + 1])
    with pytest.raises(ValueError, match="shorter than context"):
        lm_sequences("abc", 8)


def test_model_shapes_tied_embeddings_and_causality():
    model = CausalTransformer(TINY, seed=1)
    X, _ = tiny_data(4)
    logits = model(X)
    assert logits.shape == (4, TINY.context, len(VOCAB))
    # tied: no separate output matrix; the embedding gets gradient from the output layer too
    assert not any(
        p.shape == (len(VOCAB), 16) for n, p in model.named_parameters() if n != "tok.weight"
    )
    expected = (
        len(VOCAB) * 16
        + TINY.context * 16
        + 2 * 16
        + TINY.n_layers * (4 * 16 * 16 + 2 * 4 * 16 * 16 + 4 * 16)
    )
    assert sum(p.numel() for p in model.parameters()) == expected
    # position t's logits do not depend on tokens after t
    X2 = X.clone()
    X2[:, 7:] = (X2[:, 7:] + 5) % len(VOCAB)
    out2 = model(X2)
    torch.testing.assert_close(out2[:, :7], logits[:, :7])
    assert not torch.allclose(out2[:, 7:], logits[:, 7:])
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, TINY.context + 1, dtype=torch.long))


def test_loss_is_the_token_mean_cross_entropy():
    model = CausalTransformer(TINY)
    X, y = tiny_data(3)
    logits = model(X)
    ref = nn.CrossEntropyLoss()(logits.reshape(-1, len(VOCAB)), y.reshape(-1))
    torch.testing.assert_close(lm_loss()(logits, y), ref)
    # hesse sees a likelihood loss: the GGN of the LM exists and is PSD
    small = CausalTransformer(LMConfig(d_model=4, n_layers=1, n_heads=1, context=4)).double()
    Xs, ys = lm_sequences(lm_corpus("train")[:40], 4)
    G = hesse.GGNOperator(small, lm_loss(), (Xs[:3], ys[:3])).to_dense()
    torch.testing.assert_close(G, G.T)
    assert float(torch.linalg.eigvalsh(G)[0]) > -1e-10
    # at initialisation the loss is close to ln V (small logits)
    assert abs(float(ref.detach()) - torch.log(torch.tensor(96.0))) < 0.1


def test_training_is_deterministic_and_lowers_the_loss():
    X, y = tiny_data()
    runs = []
    for _ in range(2):
        model = CausalTransformer(TINY, seed=3)
        hist = train_lm(model, X, y, steps=8, batch_size=8, lr=1e-2, warmup=2, seed=5)
        runs.append((hist, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k
    assert runs[0][0][-1] < runs[0][0][0] - 0.3


def test_unigram_loss_closed_form():
    t = torch.tensor([0, 0, 1, 1])
    # add-one smoothing over 3 symbols: p = (3/7, 3/7, 1/7)
    assert unigram_loss(t, torch.tensor([2]), vocab_size=3) == pytest.approx(
        -torch.log(torch.tensor(1 / 7)).item()
    )


def test_shipped_weights_beat_the_unigram_baseline(tmp_path):
    w = lm_workload(num_train=16, num_test=64)
    assert isinstance(w, LMWorkload) and isinstance(w, Workload)
    assert w.train[0].shape == (16, 64) and w.test[0].shape == (64, 64)
    assert w.model(w.train[0][:2]).shape == (2, 64, 96)
    uni, test = w.unigram_loss("test"), w.loss("test")
    assert 3.0 < uni < 3.5
    assert test < uni - 1.0, (test, uni)  # 1.94 vs 3.27 nats/token for the full test split
    assert 0.3 < w.accuracy() < 1.0
    # same model on every load; save/load round trip
    torch.testing.assert_close(lm_workload(num_train=1).model.tok.weight, w.model.tok.weight)
    save_lm_weights(w.model, tmp_path / "m.npz", note="x")
    m2, meta = load_lm_weights(tmp_path / "m.npz")
    assert meta["note"] == "x" and meta["config"]["d_model"] == 64
    torch.testing.assert_close(m2(w.test[0][:2]), w.model(w.test[0][:2]))
    with pytest.raises(ValueError, match="pretrained=False"):
        lm_workload(steps=10)


def test_untrained_workload_and_dtype():
    w = lm_workload(
        pretrained=False, config=TINY, steps=0, num_train=4, num_test=4, dtype=torch.float64
    )
    assert w.model.tok.weight.dtype == torch.float64
    assert w.name == "lm-transformer-d16-l2-h2-t12"
    assert w.loss("train") == pytest.approx(float(torch.log(torch.tensor(96.0))), abs=0.1)


def test_kfac_and_shampoo_train_the_lm_with_its_own_loss():
    """The workload's OutputLoss is a module, so K-FAC's loss hook records its statistics."""
    from hesse.optim import KFAC, Shampoo

    X, y = tiny_data(8)
    for make in (
        lambda m: KFAC(m.parameters(), model=m, loss_fn=lm_loss(), lr=0.5),
        lambda m: Shampoo(m.parameters(), lr=1e-2),
    ):
        torch.manual_seed(0)
        model = CausalTransformer(TINY)
        opt = make(model)
        loss_fn = opt.loss_fn if hasattr(opt, "loss_fn") else lm_loss()
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0] - 0.1, losses
