"""Every config value and every safetensors header field is checked before anything is allocated."""

import json
import math
import struct

import pytest

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.stfile import read_header
from gpt2load.model.config import MAX_PARAMS, PRESETS, GPTConfig, read_hf_config, read_hparams


@pytest.mark.parametrize("cfg", list(PRESETS.values()))
def test_the_presets_are_valid(cfg):
    assert GPTConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_layers", 0),
        ("n_layers", -1),
        ("n_layers", 1_000_000_000),
        ("n_layers", True),
        ("n_layers", 12.0),
        ("n_layers", "12"),
        ("n_layers", None),
        ("vocab_size", float("nan")),
        ("context_length", 1 << 30),
        ("emb_dim", 1 << 20),
        ("n_heads", 0),
        ("drop_rate", float("nan")),
        ("drop_rate", 1.0),
        ("drop_rate", -0.1),
        ("drop_rate", True),
        ("qkv_bias", 1),
    ],
)
def test_bad_values_are_named(field, value):
    with pytest.raises(Gpt2LoadError, match=f"{field}="):
        GPTConfig(**{field: value})


def test_heads_must_divide_the_width():
    with pytest.raises(Gpt2LoadError, match="not divisible by n_heads 5"):
        GPTConfig(emb_dim=768, n_heads=5)


def test_the_parameter_ceiling_is_checked_from_arithmetic_alone():
    big = dict(emb_dim=8192, n_heads=64, n_layers=200)  # each value in range, 161B parameters together
    assert GPTConfig(emb_dim=8192, n_heads=64, n_layers=1).n_params < MAX_PARAMS
    with pytest.raises(Gpt2LoadError, match=r"describes 161,\d{3},\d{3},\d{3} parameters"):
        GPTConfig(**big)


def test_file_readers_name_the_file(tmp_path):
    hp = tmp_path / "hparams.json"
    hp.write_text('{"n_vocab": 96, "n_ctx": 32, "n_embd": 24, "n_head": 3, "n_layer": NaN}')
    with pytest.raises(Gpt2LoadError, match=r"hparams.json: config value n_layers=nan"):
        read_hparams(hp)
    cfg = tmp_path / "config.json"
    for text, needle in [("[]", "not an object"), ("{", "not valid JSON"), ("{}", "lacks"), (b"\xff", "JSON")]:
        cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(Gpt2LoadError, match=needle):
            read_hf_config(cfg)


def test_book_dicts_are_checked_too():
    with pytest.raises(Gpt2LoadError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({"n_layer": 2})
    with pytest.raises(Gpt2LoadError, match="JSON object"):
        GPTConfig.from_dict([1, 2])


def _st(tmp_path, header: dict, data: int) -> object:
    raw = json.dumps(header).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data))
    return p


@pytest.mark.parametrize(
    ("entry", "data", "needle"),
    [
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, 16, None),  # valid
        ({"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}, 0, None),  # empty is fine
        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, 8, "unknown dtype"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, 16, "12 bytes for F32 shape"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, 15, "outside the file"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}, 16, "outside the file"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16, 32]}, 32, "data_offsets"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, 8, "shape"),
        ({"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}, 4, "shape"),
        ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}, 16, "bytes for F32 shape"),
        ([1, 2], 0, "not an object"),
    ],
)
def test_safetensors_header_fields(tmp_path, entry, data, needle):
    path = _st(tmp_path, {"t": entry}, data)
    if needle is None:
        header, _ = read_header(path)
        assert header["t"]["shape"] == entry["shape"] and math.prod(entry["shape"]) * 4 == data
    else:
        with pytest.raises(Gpt2LoadError, match=needle):
            read_header(path)
