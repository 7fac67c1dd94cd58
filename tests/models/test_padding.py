"""Padded batches (attention_mask): a left-padded row is a document that starts at its first real
token (models/common/varlen.py restarts every mixer there), so forward, greedy generation and the loss of a
padded batch equal those of each row alone, for every mixer; what cannot be exact is one clear error."""
import pytest
import torch

from tests.models.test_varlen import GRAD_TOL, KINDS, TOL, grad_err, tiny

LENGTHS = [10, 3, 7]  # pads 0, 7, 3: inside and across chunk / mini-batch / window boundaries
PAD = 3


def left_padded(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    return ids, mask


def prompts_of(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g) for n in LENGTHS]


def test_left_padded_generate_equals_each_prompt_alone():
    """One model with every mixer (any layer off would change the scores): greedy generate on a
    left-padded batch = generate on each prompt alone (tokens, and the scores of every step ≤ TOL;
    a row that meets EOS alone goes on with pads in the batch)."""
    model = tiny(KINDS)
    prompts = prompts_of()
    ids, mask = left_padded(prompts)
    T = ids.shape[1]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)
        for b, p in enumerate(prompts):
            ref = model.generate(p[None], **kw)
            got, want = batch.sequences[b, T:], ref.sequences[0, len(p):]
            assert torch.equal(got[:len(want)], want) and bool((got[len(want):] == PAD).all()), (b, got, want)
            err = max((s[b] - r[0]).abs().max().item() for s, r in zip(batch.scores, ref.scores))
            assert err <= TOL, (b, err)


def test_padded_forward_and_loss_equal_each_row_alone():
    """Every mixer: a left-padded batch (labels −100 on the pads) gives each row's logits alone on its
    real tokens, and the loss of the rows alone (the mean over all their predictions)."""
    model = tiny(KINDS)
    prompts = prompts_of(1)
    ids, mask = left_padded(prompts)
    T = ids.shape[1]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        alone = [model(p[None], labels=p[None]) for p in prompts]
    for b, (p, a) in enumerate(zip(prompts, alone)):
        assert (out.logits[b, T - len(p):] - a.logits[0]).abs().max() <= TOL, b
    n = sum(len(p) - 1 for p in prompts)
    ref = sum(a.loss * (len(p) - 1) for p, a in zip(prompts, alone)) / n
    assert abs(out.loss.item() - ref.item()) <= TOL, (out.loss.item(), ref.item())


def reference_loss(model, prompts):
    """The loss of the rows alone: the mean over all their predictions."""
    n = sum(len(p) - 1 for p in prompts)
    return sum(model(p[None], labels=p[None]).loss * (len(p) - 1) for p in prompts) / n


def test_padded_training_batches_give_the_unpadded_loss_and_gradients():
    """Left padding, and right padding without a cache: the loss and every gradient of the rows alone,
    whether or not the pads' labels are −100 (a pad neither predicts nor is predicted); with
    Trainer's num_items_in_batch the loss is the sum of the token losses over that count."""
    model = tiny(["ttt_linear", "swa"])
    prompts = prompts_of(1)
    params = list(model.parameters())
    ref = reference_loss(model, prompts)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    ids, mask = left_padded(prompts)
    right = torch.stack([torch.cat([p, torch.full((ids.shape[1] - len(p),), PAD)]) for p in prompts])
    for x, m, cache in ((ids, mask, True), (right, mask.flip(1), False)):
        for labels in (x.masked_fill(m == 0, -100), x):
            loss = model(x, attention_mask=m, labels=labels, use_cache=cache).loss
            assert abs(loss.item() - ref.item()) <= TOL, (loss.item(), ref.item())
        g = torch.autograd.grad(loss, params, allow_unused=True)
        for (name, _), g1, g2 in zip(model.named_parameters(), g, g_ref):
            assert (g1 is None) == (g2 is None), name
            if g1 is not None:
                assert grad_err(g1, g2) <= GRAD_TOL, name
    n = sum(len(p) - 1 for p in prompts)
    summed = model(ids, attention_mask=mask, labels=ids, num_items_in_batch=torch.tensor(n + 5)).loss
    assert abs(summed.item() - ref.item() * n / (n + 5)) <= TOL


def test_padding_that_cannot_be_exact_is_one_clear_error():
    model = tiny(["ttt_linear", "swa"])
    prompts = prompts_of()
    ids, mask = left_padded(prompts)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=right)
    with pytest.raises(ValueError, match="right padding"):
        model.generate(ids, attention_mask=right, max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    hole = torch.ones_like(mask)
    hole[0, 4] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        model(ids, attention_mask=hole, use_cache=False)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        model(ids, attention_mask=empty)
    with pytest.raises(ValueError, match="shape"):
        model(ids, attention_mask=mask[:, 1:])
    state = model(ids).memory_state
    with pytest.raises(ValueError, match="first call"):
        model(ids, attention_mask=mask, memory_state=state)
    # an all-ones mask, or none, is the plain call; generate never guesses padding from pad_token_id
    assert torch.equal(model(ids, attention_mask=torch.ones_like(mask)).logits, model(ids).logits)
    kw = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(ids, pad_token_id=PAD, **kw), model.generate(ids, pad_token_id=PAD + 1, **kw))
