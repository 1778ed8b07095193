"""GGUF export: tiny llama, mistral and qwen2 models written as llama.cpp's converter writes them load back in
transformers with the same weights and logits, tokenize the same, quantize to the types and sizes llama.cpp expects,
and come with an Ollama Modelfile; unsupported or damaged models stop with one line and write nothing. Where
llama-cpp-python is installed, llama.cpp itself loads the files and must tokenize and complete as transformers does.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from distil_codegpt.cli import main
from distil_codegpt.fim_templates import TEMPLATES
from distil_codegpt.model import families
from distil_codegpt.model.gguf_export import FIM, PRE_TOKENIZERS

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ["textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py"]
SPECIALS = {
    "gpt-2": ["<s>", "</s>", "<pad>", "<|UNKNOWN|>"],  # as `distil-codegpt tokenizer` trains them
    "smollm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]
    + ["<fim_pad>", "<repo_name>", "<file_sep>"],  # SmolLM2's first ids
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    + ["<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"],
}
# real code (a file the tokenizers never saw) plus digits, unicode, runs of spaces and tabs, CRLF
CODE = (
    (STDLIB / "colorsys.py").read_text()[:3000]
    + "\n\tx = 1234567 + 3.14159e-10\t# naïve café ✓ 日本語 😀 ¹²³\n        \t  \n"
    + "    return {'DON\\'T': [0x1F, 22, 333]}\r\n"
)


def make_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A 600-token byte-level BPE trained on a few stdlib files, split as `style` (llama.cpp's pre-tokenizer name)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[style]
    tok.decoder = decoders.ByteLevel()
    texts = [(STDLIB / name).read_text() for name in TRAIN_FILES]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS[style], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    if style == "gpt-2":
        specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<|UNKNOWN|>"}
    else:
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **specials)


def make_model(family: str, vocab: int, tie: bool = True, **shape: int) -> PreTrainedModel:
    """2 layers, width 64, 4 heads over 2 KV heads; weights spread wide (std 0.2) and random norms, so that logits
    have clear winners and a wrong permutation or a swapped norm shows."""
    torch.manual_seed(0)
    full = {"layers": 2, "width": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "context": 256, **shape}
    config = families.model_config(
        family, vocab, {**full, "tie_word_embeddings": tie, "initializer_range": 0.2}, bos_token_id=0, eos_token_id=0
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


# key -> (family, tokenizer style, tied, shape overrides)
CASES = {
    "smollm2": ("llama", "smollm", True, {}),  # SmolLM2's layout: llama, tied head, StarCoder's digits and FIM
    "qwen2": ("qwen2", "qwen2", True, {}),  # q/k/v biases, no permutation
    "llama-cut": ("llama", "gpt-2", False, {"width": 48, "head_dim": 16}),  # a student cut under its head size
    "tiny-mistral": ("mistral", "gpt-2", True, {}),  # (a GGUF named exactly "mistral" trips transformers' loader)
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[PreTrainedModel, PreTrainedTokenizerFast, Path]]:
    root = tmp_path_factory.mktemp("gguf-export")
    toks = {style: make_tokenizer(style) for style in PRE_TOKENIZERS if style != "llama-bpe"}
    out = {}
    for key, (family, style, tie, shape) in CASES.items():
        model = make_model(family, len(toks[style]), tie, **shape)
        model.save_pretrained(root / key)
        toks[style].save_pretrained(root / key)
        out[key] = (model, toks[style], root / key)
    return out


def export(model_dir: Path, out: Path, quant: str = "f32") -> int:
    return main(["export", "--model", str(model_dir), "--format", "gguf", "--quant", quant, "--out", str(out)])


@pytest.fixture(scope="module")
def f32(saved: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("f32")
    for key, (_, _, model_dir) in saved.items():
        assert export(model_dir, root / f"{key}.gguf") == 0
    return {key: root / f"{key}.gguf" for key in saved}


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents() if key in reader.fields else None


def _logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _permute(w: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order, written out again here so that the test does not trust the module's."""
    a = w.numpy()
    return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


@pytest.mark.parametrize("key", list(CASES))
def test_f32_loads_back_in_transformers(saved: dict, f32: dict, key: str) -> None:
    ref, tok, _ = saved[key]
    path = f32[key]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    state, expected = model.state_dict(), ref.state_dict()
    assert set(state) == set(expected)
    for name, t in expected.items():
        assert torch.equal(state[name], t), name  # f32 throughout, Q/K permutation undone exactly
    ids = tok(CODE[:400], add_special_tokens=False)["input_ids"]
    assert torch.equal(_logits(model, ids), _logits(ref, ids))

    reader = gguf.GGUFReader(path)
    c, arch = ref.config, "qwen2" if key == "qwen2" else "llama"
    head_dim = families.head_dim(ref)
    assert _field(reader, "general.architecture") == arch and _field(reader, "general.name") == key
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert _field(reader, f"{arch}.block_count") == 2 and _field(reader, f"{arch}.context_length") == 256
    assert _field(reader, f"{arch}.embedding_length") == families.width(ref)
    assert _field(reader, f"{arch}.feed_forward_length") == 128
    assert (_field(reader, f"{arch}.attention.head_count"), _field(reader, f"{arch}.attention.head_count_kv")) == (4, 2)
    assert _field(reader, f"{arch}.rope.freq_base") == c.rope_parameters["rope_theta"]
    assert _field(reader, f"{arch}.rope.dimension_count") == head_dim
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    cut = key == "llama-cut"  # 4 heads of 16 on a width of 48
    assert _field(reader, f"{arch}.attention.key_length") == (16 if cut else None)
    assert _field(reader, f"{arch}.attention.value_length") == (16 if cut else None)

    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not c.tie_word_embeddings)
    q, k = ref.model.layers[1].self_attn.q_proj.weight.detach(), ref.model.layers[1].self_attn.k_proj.weight.detach()
    q_file, k_file = (np.asarray(tensors[f"blk.1.attn_{n}.weight"].data) for n in "qk")
    if arch == "llama":
        assert np.array_equal(q_file, _permute(q, 4)) and np.array_equal(k_file, _permute(k, 2))
        assert not np.array_equal(q_file, q.numpy())
    else:
        assert np.array_equal(q_file, q.numpy()) and np.array_equal(k_file, k.numpy())
        bias = ref.model.layers[0].self_attn.k_proj.bias.detach().numpy()
        assert np.array_equal(np.asarray(tensors["blk.0.attn_k.bias"].data), bias)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


@pytest.mark.parametrize("key", ["qwen2", "llama-cut"])  # the qwen2 and the GPT-2 (our tokenizers') splits
def test_tokenizer_round_trip_in_transformers(saved: dict, f32: dict, key: str) -> None:
    _, tok, _ = saved[key]
    path = f32[key]
    loaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tok(CODE, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1000
    assert loaded(CODE, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == CODE
    assert loaded.convert_ids_to_tokens(list(range(len(tok)))) == tok.convert_ids_to_tokens(list(range(len(tok))))


def test_tokenizer_metadata(saved: dict, f32: dict) -> None:
    smol = gguf.GGUFReader(f32["smollm2"])
    assert _field(smol, "tokenizer.ggml.model") == "gpt2" and _field(smol, "tokenizer.ggml.pre") == "smollm"
    # a SmolLM2 student read `<|endoftext|>` (id 0) before each file: llama.cpp puts it first
    assert (_field(smol, "tokenizer.ggml.bos_token_id"), _field(smol, "tokenizer.ggml.add_bos_token")) == (0, True)
    fim = {
        role: _field(smol, f"tokenizer.ggml.fim_{role}_token_id") for role in ("pre", "suf", "mid", "pad", "rep", "sep")
    }
    assert fim == {"pre": 3, "suf": 5, "mid": 4, "pad": 6, "rep": 7, "sep": 8}
    types = _field(smol, "tokenizer.ggml.token_type")
    assert types[:9] == [gguf.TokenType.CONTROL] * 9 and set(types[9:]) == {gguf.TokenType.NORMAL}
    assert len(_field(smol, "tokenizer.ggml.merges")) == 600 - 9 - 256

    qwen = gguf.GGUFReader(f32["qwen2"])
    assert _field(qwen, "tokenizer.ggml.pre") == "qwen2" and _field(qwen, "tokenizer.ggml.fim_pre_token_id") == 3

    ours = gguf.GGUFReader(f32["llama-cut"])  # <s> </s> <pad> <|UNKNOWN|>, as our tokenizers
    assert _field(ours, "tokenizer.ggml.pre") == "gpt-2"
    ids = [_field(ours, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")]
    assert ids == [0, 1, 2, 3] and _field(ours, "tokenizer.ggml.add_bos_token") is True
    assert "tokenizer.ggml.fim_pre_token_id" not in ours.fields


def test_gguf_fim_table_is_the_prefix_first_templates() -> None:
    assert set(FIM) == {"starcoder", "qwen", "codellama", "deepseek"}
    assert all(FIM[name] is TEMPLATES[name] for name in FIM)


def test_modelfile_and_printed_commands(saved: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "smol.gguf"
    assert export(saved["smollm2"][2], out, "q8_0") == 0
    printed = capsys.readouterr().out
    assert f"llama-server -m {out} --port 8012" in printed
    assert f"ollama create smol -f {tmp_path / 'smol.Modelfile'}" in printed and f"lms import {out}" in printed
    lines = (tmp_path / "smol.Modelfile").read_text().splitlines()
    assert lines[1:5] == [
        "FROM ./smol.gguf",
        'TEMPLATE """{{- if .Suffix }}<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>'
        '{{- else }}{{ .Prompt }}{{- end }}"""',
        "PARAMETER temperature 0",
        "PARAMETER num_ctx 256",
    ]
    assert 'PARAMETER stop "<|endoftext|>"' in lines and 'PARAMETER stop "<file_sep>"' in lines

    plain = tmp_path / "ours.gguf"
    assert export(saved["tiny-mistral"][2], plain, "f16") == 0
    text = (tmp_path / "ours.Modelfile").read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and 'PARAMETER stop "</s>"' in text and ".Suffix" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.Modelfile", "ours.gguf", "smol.Modelfile", "smol.gguf"]
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~mask  # as a plain open() makes it, not mkstemp's 0600


QT = gguf.GGMLQuantizationType


@pytest.mark.parametrize(
    ("quant", "matrix", "head"),
    [("f16", QT.F16, QT.F16), ("bf16", QT.BF16, QT.BF16), ("q8_0", QT.Q8_0, QT.Q8_0), ("q4_0", QT.Q4_0, QT.Q8_0)],
)
def test_quantized_types_and_sizes(saved: dict, tmp_path: Path, quant: str, matrix: QT, head: QT) -> None:
    """Norms stay f32; ffn_down's rows (80 inputs) are not whole 32-blocks, so q8_0/q4_0 fall back to f16 there."""
    _, tok, _ = saved["smollm2"]
    ref = make_model("llama", len(tok), ffn=80)
    ref.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / f"m-{quant}.gguf"
    assert export(tmp_path / "m", out, quant) == 0
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[quant]
    types = {t.name: t.tensor_type for t in reader.tensors}
    blocked = quant in ("q8_0", "q4_0")
    for name, t in types.items():
        if name.endswith("norm.weight"):
            assert t == QT.F32, name
        elif name == "token_embd.weight":  # tied: it is the output head too
            assert t == head, name
        elif name.endswith("ffn_down.weight"):
            assert t == (QT.F16 if blocked else matrix), name
        else:
            assert t == matrix, name
    bytes_per_value = {QT.F32: 4, QT.F16: 2, QT.BF16: 2, QT.Q8_0: 34 / 32, QT.Q4_0: 18 / 32}
    for t in reader.tensors:
        assert t.n_bytes == t.n_elements * bytes_per_value[t.tensor_type], t.name
    payload = sum(t.n_bytes for t in reader.tensors)
    assert payload < out.stat().st_size < payload + 40_000  # the rest is metadata (600 tokens, 335 merges)

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    # relative RMS error of a weight read back, and of the logits (measured: f16 4e-4 / 2e-3, bf16 3e-3 / 0.015,
    # q8_0 4e-3 / 0.044, q4_0 0.1 / 0.5 on this random model, whose wide weights amplify 4-bit noise)
    weight_bound, logits_bound = {"f16": (1e-3, 0.01), "bf16": (8e-3, 0.05), "q8_0": (8e-3, 0.1), "q4_0": (0.15, 0.8)}[
        quant
    ]
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        w_ref, w = ref.state_dict()[name], model.state_dict()[name]
        assert 0 < ((w - w_ref).norm() / w_ref.norm()).item() < weight_bound, name  # permuted back after quantizing
    emb, emb_ref = model.model.embed_tokens.weight.detach(), ref.model.embed_tokens.weight.detach()
    assert ((emb - emb_ref).norm() / emb_ref.norm()).item() < (8e-3 if blocked else weight_bound)  # q4_0: head q8_0
    ids = tok(CODE[:300], add_special_tokens=False)["input_ids"]
    a, b = _logits(ref, ids), _logits(model, ids)
    assert ((a - b).norm() / a.norm()).item() < logits_bound


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line (transformers' progress bars may come before it on stderr)."""
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("distil-codegpt export: error: "), last
    return last


def test_unsupported_family_one_line(tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.gguf"
    assert export(tiny_gpt2_dir, out) == 2
    err = _error(capsys)
    assert "is a gpt2 model" in err and "GGUF export supports llama, mistral, qwen2" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_gpt2_dir(saved: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, tok, _ = saved["llama-cut"]
    d = tmp_path_factory.mktemp("gpt2") / "m"
    config = families.model_config("gpt2", len(tok), {"layers": 2, "width": 64, "heads": 2, "context": 256})
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_damaged_model_one_line(saved: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    d = tmp_path / "m"
    shutil.copytree(saved["qwen2"][2], d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    out = tmp_path / "out" / "q.gguf"
    assert export(d, out) == 2
    assert "distil-codegpt export: error: model" in _error(capsys)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_unknown_pre_tokenizer_refused(saved: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tok, _ = saved["llama-cut"]
    odd = make_tokenizer("gpt-2")
    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # " x" for "x"
    model.save_pretrained(tmp_path / "m")
    odd.save_pretrained(tmp_path / "m")
    assert export(tmp_path / "m", tmp_path / "m.gguf") == 2
    err = _error(capsys)
    assert "matches none llama.cpp knows here" in err and "gpt-2, smollm, qwen2, llama-bpe" in err
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf.*"))


def test_existing_file_and_flag_mixups(
    f32: dict, saved: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = f32["qwen2"].read_bytes()
    assert export(saved["qwen2"][2], f32["qwen2"]) == 2
    assert "already exists" in _error(capsys) and f32["qwen2"].read_bytes() == before
    args = ["export", "--model", str(saved["qwen2"][2])]
    assert main([*args, "--out", str(tmp_path / "d"), "--quant", "q4_0"]) == 2
    assert "quant: 'q4_0' is not allowed; --quant is for --format gguf" in _error(capsys)
    assert main([*args, "--format", "gguf", "--out", str(tmp_path / "x.bin")]) == 2
    assert "name the file FILE.gguf" in _error(capsys)
    assert main([*args, "--format", "gguf", "--quantize", "int8", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "pass --quant q8_0 or q4_0" in _error(capsys)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- llama.cpp itself (llama-cpp-python)


def _llama(path: Path):
    """llama.cpp with an f32 KV cache: its default f16 cache alone moves these logits by about 1e-2."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, type_k=f32, type_v=f32)


@pytest.mark.parametrize("key", list(CASES))
def test_llama_cpp_tokenizes_as_transformers(saved: dict, f32: dict, key: str) -> None:
    llm = _llama(f32[key])
    tok = saved[key][1]
    for text in (CODE, CODE[1000:1500], "  \t\n\n    x = 10_000  # ✓\n", "123456789 ١٢٣"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text[:40]
    # llama.cpp puts first what the model read before each file: <s> for ours, <|endoftext|> for the others (id 0)
    assert llm.tokenize(b"x", add_bos=True, special=True)[:1] == [0]
    assert llm.token_bos() == 0


@pytest.mark.parametrize("key", list(CASES))
def test_llama_cpp_logits_and_greedy(saved: dict, f32: dict, key: str) -> None:
    """Measured on these models (logits up to ~7): max |llama.cpp - transformers| about 1.1e-5 over 100 positions."""
    ref, tok, _ = saved[key]
    llm = _llama(f32[key])
    ids = tok(CODE[:500], add_special_tokens=False)["input_ids"][:100]
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    assert np.abs(ours - _logits(ref, ids).numpy()).max() < 1e-4

    prompt, hf = ids[:40], ids[:40]
    for _ in range(20):
        hf = [*hf, int(_logits(ref, hf)[-1].argmax())]
    cpp = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        cpp.append(token)
        if len(cpp) == 20:
            break
    assert cpp == hf[40:]


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_runs_quantized_files(saved: dict, tmp_path: Path, quant: str) -> None:
    """llama.cpp against transformers reading the same file (the same dequantized weights): measured relative RMS
    logit difference 1.2e-3 for f16 and 3.2e-2 for q8_0/q4_0, from llama.cpp's f16/q8_0 activations in the dot
    products; a wrong block layout would give ~1."""
    ref, tok, model_dir = saved["smollm2"]
    out = tmp_path / f"{quant}.gguf"
    assert export(model_dir, out, quant) == 0
    llm = _llama(out)
    ids = tok(CODE[:500], add_special_tokens=False)["input_ids"][:100]
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    theirs = _logits(hf, ids).numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < (0.01 if quant == "f16" else 0.1)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_llama_cpp_reads_our_codexglue_tokenizer(tiny_data: dict, tmp_path: Path) -> None:
    """A tokenizer `distil-codegpt tokenizer` trains: <s> </s> <pad> <|UNKNOWN|>, then `<EOL>`, ` <EOL>`, literal
    tokens as user-defined tokens, which llama.cpp must match whole, as transformers does."""
    from distil_codegpt.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_data["tok"])
    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert export(tmp_path / "m", tmp_path / "m.gguf") == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.convert_tokens_to_ids(" <EOL>")] == gguf.TokenType.USER_DEFINED
    llm = _llama(tmp_path / "m.gguf")
    text = (tiny_data["data"] / "test.txt").read_text().splitlines()[0][:3000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids(" <EOL>") in ids
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # `<s>` in codexglue text is bos
    assert llm.tokenize(b"x", add_bos=True, special=False)[0] == tok.convert_tokens_to_ids("<s>")
