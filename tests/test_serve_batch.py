"""xlabml.inference.GenerationBatch, the step-level API under the server's continuous batching: rows that join
and leave between steps get exactly the tokens `sample` gives each of them alone."""
import pytest
import torch

from xlabml import inference
from xlabml.layers import Decoder

V, BLOCK = 40, 16
MODELS = {
    "learned": {"position": "learned"},
    "rope-gqa": {"position": "rope", "n_kv_heads": 2},
    "alibi-sliding-window": {"position": "alibi", "sliding_window": 6, "n_kv_heads": 2},
}


def make_model(**kwargs):
    torch.manual_seed(0)
    # float64: batched and lone logits agree far below any gap between candidates (as in test_inference)
    model = Decoder(V, BLOCK, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.1, **kwargs).double()
    with torch.no_grad():  # sharper than at initialisation: what a token sees changes which token comes next
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(10.0)
    return model


def rows():
    """Prompts of different lengths (one longer than BLOCK), limits that run past BLOCK, greedy and sampled
    rows with their own settings."""
    specs = []
    for i, (length, limit) in enumerate([(10, 30), (3, 6), (6, 10), (2, 14), (20, 8), (5, 18), (4, 22)]):
        sampling = {"temperature": 0.0} if i % 3 == 0 else {
            "temperature": 0.7 + 0.1 * i, "top_p": 0.9 if i % 2 else None, "top_k": 12 if i == 4 else None,
            "repetition_penalty": 1.3 if i == 5 else 1.0, "seed": 100 + i}
        prompt = torch.randint(0, V, (length,), generator=torch.Generator().manual_seed(i))
        specs.append((prompt, limit, sampling))
    return specs


def an_eos(model, specs):
    """A class that ends row 0 after a few tokens (other rows end at their own first one, or never)."""
    return inference.sample(model, *specs[0][:2], BLOCK, temperature=0.0).tolist()[3]


def lone(model, eos, prompt, limit, sampling):
    """What `sample` gives the row alone, with its <eos> kept (as `step` returns it)."""
    sampling = dict(sampling)
    seed = sampling.pop("seed", None)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = inference.sample(model, prompt, limit, BLOCK, eos_class=eos, generator=generator, exclude_classes=[0],
                           **sampling)
    out = out.tolist()
    return out if len(out) == limit else out + [eos]


def add(batch, eos, prompt, limit, sampling):
    sampling = dict(sampling)
    seed = sampling.pop("seed", None)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return batch.add(prompt, limit, eos_class=eos, exclude_classes=[0], generator=generator, **sampling)


@pytest.mark.parametrize("variant", MODELS)
def test_rows_joining_and_leaving_between_steps_equal_their_lone_runs(variant):
    model = make_model(**MODELS[variant])
    specs = rows()
    eos = an_eos(model, specs)
    expected = [lone(model, eos, *spec) for spec in specs]
    got, ids, finished = {}, {}, set()
    with inference.GenerationBatch(model, BLOCK) as batch:
        step = 0
        while len(ids) < len(specs) or batch:
            if len(ids) < len(specs) and step % 3 == 0:  # a row joins every third step
                k = len(ids)
                ids[add(batch, eos, *specs[k])] = k
                got[k] = []
            for row, token, done in batch.step():
                assert row not in finished  # a finished row gets no more tokens
                got[ids[row]].append(token)
                if done:
                    finished.add(row)
            step += 1
        assert batch.merges > 0 and batch.rebuilds > 1  # joins of both kinds happened
    assert [got[k] for k in range(len(specs))] == expected
    assert expected[0][-1] == eos and any(len(e) == s[1] for e, s in zip(expected, specs))
    assert max(len(s[0]) + len(e) for s, e in zip(specs, expected)) > BLOCK  # windows slid


def test_removed_row_stops_and_the_others_go_on():
    model = make_model(position="rope")
    specs = rows()[:4]
    expected = [lone(model, None, *spec) for spec in specs]
    with inference.GenerationBatch(model, BLOCK) as batch:
        ids = [add(batch, None, *spec) for spec in specs]
        got = {row: [] for row in ids}
        for step in range(40):
            if step == 3:
                batch.remove(ids[1])
                batch.remove(ids[1])  # twice: nothing more happens
            results = batch.step()
            if not results:
                break
            for row, token, _ in results:
                got[row].append(token)
        assert len(batch) == 0 and batch.step() == []
    assert got[ids[1]] == expected[1][:3]
    assert [got[i] for i in (ids[0], ids[2], ids[3])] == [expected[0], expected[2], expected[3]]


def test_bad_arguments_raise_before_the_row_joins():
    model = make_model()
    with inference.GenerationBatch(model, BLOCK) as batch:
        with pytest.raises(ValueError, match="max_new_tokens=0"):
            batch.add([1, 2], 0)
        with pytest.raises(ValueError, match="top_p=1.5"):
            batch.add([1, 2], 4, top_p=1.5)
        with pytest.raises(ValueError, match=r"exclude_classes \[40\]"):
            batch.add([1, 2], 4, exclude_classes=[V])
        with pytest.raises(ValueError, match="prompt 0 is empty"):
            batch.add([], 4)
        assert len(batch) == 0 and batch.step() == []
        row = batch.add([1, 2], 2, temperature=0)
        assert [r for r, _, _ in batch.step()] == [row]
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        batch.add([1, 2], 2)
