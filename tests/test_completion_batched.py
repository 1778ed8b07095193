"""Batched greedy decoding (slots, KV cache, rows leaving as they end) gives exactly what one-at-a-time `generate`
gives, for every batch size, on mixed lengths and mixed raw/normalised inputs.

The reference is HF `generate` on each input alone (no padding, its own cache), through the same `encode_inputs` and
`finish` as `complete`: what is under test is the decoding loop.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from distil_codegpt.data.line_completion import read_examples
from distil_codegpt.data.tokenizer import encode_documents, load_tokenizer
from distil_codegpt.engines.base import line_end_pick
from distil_codegpt.evaluate import completion
from distil_codegpt.evaluate.completion import StopIds, complete, encode_inputs, finish, is_raw

MAX_NEW = 12
CONTEXT = 128


@pytest.fixture(scope="module")
def tok(tiny_data: dict):
    return load_tokenizer(tiny_data["tok"])


def sources(tiny_data: dict) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(Path(tiny_data["root"] / "src").glob("*.py"))]


@pytest.fixture(scope="module")
def model(tiny_data: dict, tok) -> GPT2LMHeadModel:
    """2 layers x 64, trained 300 steps on normalised and raw code: it ends some lines after a few tokens, others
    later, others not within MAX_NEW; in raw mode with a newline token, in normalised mode with `<EOL>`."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=CONTEXT,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    docs = (tiny_data["data"] / "train.txt").read_text(encoding="utf-8").split("\n")
    ids = encode_documents(tok, [d for d in docs if d], "codexglue") + encode_documents(tok, sources(tiny_data), "raw")
    stream = torch.tensor([i for doc in ids for i in doc])
    windows = stream[: len(stream) // 32 * 32].view(-1, 32)  # (N, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more, and loses much on a busy machine
    try:
        for _ in range(300):
            batch = windows[torch.randint(len(windows), (16,))]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def inputs(tiny_data: dict) -> list[str]:
    """Normalised test inputs (most cut after 4 to 200 words), raw source cut mid-line, a few short ones; shuffled."""
    rng = random.Random(0)
    normalised = []
    for ex in read_examples(tiny_data["data"] / "line_completion" / "test.json")[:18]:
        words = ex.input.split(" ")
        normalised.append(" ".join(words[: rng.randrange(4, 200)]) if rng.random() < 0.7 else ex.input)
    raw = []
    for text in sources(tiny_data)[:6]:
        for _ in range(3):
            cut = rng.randrange(10, min(len(text), 500))
            raw.append(text[:cut].rstrip("\n"))
    out = normalised + ["<s> import os <EOL> if", "<s> x ="] + raw + ["def f(", "import"]
    rng.shuffle(out)
    return out


def one_at_a_time(model: GPT2LMHeadModel, tok, text: str, max_new: int = MAX_NEW) -> tuple[str, int]:
    """(completion, tokens generated, stop token included) by `generate` on this input alone."""
    stops = StopIds.of(tok)
    ids = torch.tensor([encode_inputs(tok, [text], CONTEXT - max_new)[0]])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=stops.for_mode(is_raw(text)),
            pad_token_id=stops.fill,
        )
    new = out[0, ids.shape[1] :].tolist()
    return finish(tok, new, is_raw(text), stops), len(new)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_greedy_equals_one_at_a_time_generate(model, tok, inputs, attention, monkeypatch, request) -> None:
    model.set_attn_implementation(attention)  # eager takes an additive mask, sdpa a boolean one
    request.addfinalizer(lambda: model.set_attn_implementation("sdpa"))
    reference = [one_at_a_time(model, tok, x) for x in inputs]
    expected = [text for text, _ in reference]
    # the premise: rows end at many different steps, in both modes, and some run to MAX_NEW
    steps = {mode: [n for (_, n), x in zip(reference, inputs) if is_raw(x) == mode] for mode in (False, True)}
    for mode, ns in steps.items():
        assert len({n for n in ns if n < MAX_NEW}) >= 3, (mode, ns)
    assert MAX_NEW in steps[False] + steps[True]
    lengths = {len(ids) for ids in encode_inputs(tok, inputs, CONTEXT - MAX_NEW)}
    assert len(lengths) >= 12 and max(lengths) == CONTEXT - MAX_NEW  # mixed lengths, some cut to the context
    assert len(set(expected)) > len(inputs) // 2

    compactions: list[tuple[int, int]] = []  # (rows before, rows kept): a shift keeps all, a drop fewer
    compact = completion._Slots.compact

    def spy(self, keep: torch.Tensor) -> None:
        compactions.append((len(self.first), len(keep)))
        compact(self, keep)

    monkeypatch.setattr(completion._Slots, "compact", spy)
    for batch in (1, 3, 8, 16, 24, 64):
        got = complete(model, tok, inputs, batch_size=batch, max_new_tokens=MAX_NEW, progress=False)
        assert got == expected, batch
    assert any(kept == before for before, kept in compactions)  # the buffer filled up and moved left
    assert any(kept < before for before, kept in compactions)  # ended rows were dropped


def test_one_input_and_max_new_tokens_one(model, tok, inputs) -> None:
    for x in inputs[:4]:
        assert complete(model, tok, [x], max_new_tokens=MAX_NEW, progress=False) == [one_at_a_time(model, tok, x)[0]]
    firsts = complete(model, tok, inputs, batch_size=5, max_new_tokens=1, progress=False)
    assert firsts == [one_at_a_time(model, tok, x, max_new=1)[0] for x in inputs]
    assert len(set(firsts)) > 3


def test_long_inputs_keep_their_positions_in_the_context(model, tok, tiny_data) -> None:
    """Every input cut to the context: any slot's position past it would fail the position embedding."""
    long = [ex.input for ex in read_examples(tiny_data["data"] / "line_completion" / "test.json")[:60]]
    long = [x for x in long if len(tok(x)["input_ids"]) > CONTEXT][:24]
    expected = [one_at_a_time(model, tok, x)[0] for x in long]
    for batch in (16, 24):
        assert complete(model, tok, long, batch_size=batch, max_new_tokens=MAX_NEW, progress=False) == expected


def test_line_end_pick_takes_the_ends_as_one_outcome() -> None:
    end = torch.tensor([True, True, True, False, False])
    logits = torch.tensor([[0.2, 0.2, 0.2, 0.4, 1e-9], [0.1, 0.1, 0.1, 0.5, 0.2], [0.05, 0.3, 0.05, 0.25, 0.35]]).log()
    # ends 0.6 > 0.4: the likeliest end id; ends 0.3 < 0.5: plain argmax; ends 0.4 > 0.35: id 1, not argmax 4
    assert line_end_pick(logits, end).tolist() == [0, 3, 1]
    assert line_end_pick(logits, end[None].expand(3, -1)).tolist() == [0, 3, 1]
    # majority: ends above 1/2 only (0.6; not 0.3 or 0.4)
    assert line_end_pick(logits, end, "majority").tolist() == [0, 3, 4]
    assert logits.argmax(-1).tolist() == [3, 3, 4]


def test_line_end_mass_is_greedy_only(model, tok) -> None:
    with pytest.raises(completion.ConfigError, match="greedy"):
        complete(model, tok, ["x ="], beam=2, line_end="mass", progress=False)
    with pytest.raises(completion.ConfigError, match="not one of"):
        complete(model, tok, ["x ="], line_end="sum", progress=False)


class PastKeyValuesOnly(torch.nn.Module):
    """A model as transformers 5 before the KV cache's rename: its forward takes the cache as `past_key_values` and
    drops keywords it does not know (a cache passed as `cache` would never be filled)."""

    def __init__(self, inner: GPT2LMHeadModel) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None, use_cache=None,
                logits_to_keep=0, **ignored):  # fmt: skip
        return self.inner(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)  # fmt: skip


def test_a_model_that_takes_past_key_values_decodes_the_same(model, tok, inputs) -> None:
    old = PastKeyValuesOnly(model)
    expected = [one_at_a_time(model, tok, x)[0] for x in inputs[:10]]
    assert complete(old, tok, inputs[:10], batch_size=4, max_new_tokens=MAX_NEW, progress=False) == expected
