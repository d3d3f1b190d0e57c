"""Our GGUF reader against the `gguf` package's reference (de)quantizers and writer."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from sleep_engine.gguf_file import _dequantize, _unpermute, read_gguf  # noqa: E402


@pytest.mark.parametrize("qtype,code", [(gguf.GGMLQuantizationType.Q8_0, 8), (gguf.GGMLQuantizationType.Q4_1, 3)])
def test_dequantize_matches_reference(qtype, code):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 64)).astype(np.float32)
    packed = gguf.quants.quantize(w, qtype)
    ref = gguf.quants.dequantize(packed, qtype).reshape(-1)
    ours = _dequantize(np.frombuffer(packed.tobytes(), dtype=np.uint8), code, w.size)
    assert np.array_equal(ours, ref)
    assert np.abs(ours - w.reshape(-1)).max() < 0.5   # and it is a quantization of w


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, hd, d = 3, 8, 5
    w = np.arange(n_head * hd * d, dtype=np.float32).reshape(n_head * hd, d)
    # llama.cpp's convert script: reshape(n_head, 2, hd/2, d).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, hd // 2, d).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(_unpermute(permuted, n_head), w)


def test_reads_metadata_and_tensors_written_by_the_reference_writer(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list(["a", "b", "c"])
    w = np.arange(64, dtype=np.float32).reshape(2, 32)
    writer.add_tensor("blk.0.ffn_norm.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta, tensors = read_gguf(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 1
    assert meta["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert np.array_equal(tensors["blk.0.ffn_norm.weight"], w)
