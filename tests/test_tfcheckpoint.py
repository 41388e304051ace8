"""The TensorFlow-free reader against checkpoints TensorFlow itself wrote, and OpenAI's real 124M index."""

import numpy as np
import pytest
import torch
from helpers import FIXTURES, OPENAI_124M_INDEX, OPENAI_TINY, copy_fixture

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.names import OPENAI, convert_tensors
from gpt2load.formats.tfcheckpoint import TFCheckpoint, masked_crc32c, read_index, verify_checkpoint
from gpt2load.model.config import GPTConfig


def test_reads_every_tensor_exactly_as_tensorflow_does():
    ck = TFCheckpoint(OPENAI_TINY)
    oracle = np.load(OPENAI_TINY / "expected.npz")  # written from tf.train.load_checkpoint by the fixture script
    assert sorted(ck.keys()) == sorted(oracle.files)
    for name in oracle.files:
        got = ck.read(name)
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(oracle[name])), name
    ck.verify()


def test_prefix_index_path_and_folder_resolve_alike():
    a = TFCheckpoint(OPENAI_TINY).entries
    assert TFCheckpoint(OPENAI_TINY / "model.ckpt").entries == a
    assert TFCheckpoint(OPENAI_TINY / "model.ckpt.index").entries == a


@pytest.mark.parametrize(
    ("data", "masked"),
    [
        # CRC32C check value crc32c("123456789") = 0xE3069283 (RFC 3720 / iSCSI); rotated right by 15 bits
        # that is 0x2507C60D, plus LevelDB's mask delta 0xA282EAD8 gives 0xC78AB0E5 (worked by hand).
        (b"123456789", 0xC78AB0E5),
        # RFC 3720 B.4: 32 zero bytes -> 0x8A9136AA; rotated 0x6D551522, + 0xA282EAD8 = 0x1_0FD7_FFFA, kept to 32 bits.
        (bytes(32), 0x0FD7FFFA),
        (b"", 0xA282EAD8),  # crc32c of nothing is 0: only the delta remains
    ],
)
def test_masked_crc32c_known_values(data, masked):
    assert masked_crc32c(data) == masked


def test_flipped_byte_in_data_is_caught_and_named(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    ck = TFCheckpoint(d)
    entry = ck.entries["model/h1/mlp/c_fc/w"]
    data = d / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 17] ^= 0x01
    data.write_bytes(raw)
    with pytest.raises(Gpt2LoadError, match=r"model/h1/mlp/c_fc/w.*CRC32C"):
        verify_checkpoint(d)
    TFCheckpoint(d).read("model/wte")  # other tensors still read fine


def test_truncated_shard_is_reported(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    data = d / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(Gpt2LoadError, match="truncated"):
        TFCheckpoint(d).check_shards()
    with pytest.raises(Gpt2LoadError, match="truncated"):
        TFCheckpoint(d).read("model/wte")  # the last tensor in the file


def test_missing_shard_and_damaged_index(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    (d / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(Gpt2LoadError, match="missing"):
        verify_checkpoint(d)
    index = d / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    raw[40] ^= 0xFF  # inside the data block: its CRC no longer matches
    index.write_bytes(raw)
    with pytest.raises(Gpt2LoadError, match="corrupt"):
        read_index(index)
    index.write_bytes(bytes(raw[:-10]))
    with pytest.raises(Gpt2LoadError, match="not a TensorFlow checkpoint index"):
        read_index(index)


def test_partitioned_variables_are_rejected_clearly():
    with pytest.raises(Gpt2LoadError, match=r"model/wte.*slices"):
        TFCheckpoint(FIXTURES / "tf-partitioned")


def test_other_dtypes_read_as_tensorflow_wrote_them():
    ck = TFCheckpoint(FIXTURES / "tf-int")
    oracle = np.load(FIXTURES / "tf-int" / "expected.npz")
    assert ck.read("model/ids").dtype == torch.int32
    assert torch.equal(ck.read("model/ids"), torch.from_numpy(oracle["model/ids"]))
    assert torch.equal(ck.read("model/half"), torch.from_numpy(oracle["model/half"]))
    assert ck.read("model/bf16").dtype == torch.bfloat16
    assert torch.equal(ck.read("model/bf16").float(), torch.from_numpy(oracle["model/bf16"]).float())


def test_openai_124m_real_index():
    header, entries = read_index(OPENAI_124M_INDEX / "model.ckpt.index")
    assert header.get(1, 1) == 1  # one shard
    assert len(entries) == 148
    assert all(e.dtype == 1 and e.crc32c is not None and not e.sliced for e in entries.values())
    assert entries["model/h0/attn/c_attn/w"].shape == (1, 768, 2304)
    assert entries["model/wte"].shape == (50257, 768)
    # Tensors are packed back to back: the data file is exactly 4 bytes per parameter.
    assert sum(e.size for e in entries.values()) == 497_759_232 == 4 * GPTConfig.from_name("124M").n_params
    assert max(e.offset + e.size for e in entries.values()) == 497_759_232


def test_openai_124m_names_and_shapes_map_onto_the_124m_model():
    _, entries = read_index(OPENAI_124M_INDEX / "model.ckpt.index")
    items = ((name, torch.empty(e.shape, device="meta")) for name, e in entries.items())
    out = dict(convert_tensors(items, OPENAI, GPTConfig.from_name("124M"), "124M index"))
    assert len(out) == 2 + 12 * 16 + 2  # every GPTModel parameter but the tied head
    assert out["trf_blocks.11.att.W_value.weight"].shape == (768, 768)
