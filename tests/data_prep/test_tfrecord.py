"""TFRecord framing and tf.train.Example encoding, checked against hand-computed bytes and the
published crc32c test vectors (RFC 3720 appendix B.4, and the usual "123456789" check value)."""

import random
import struct

import pytest

from data_prep import tfrecord


def reference_crc32c(data: bytes) -> int:
    """Bit-by-bit CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the definition, not a table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data,expected", VECTORS)
def test_crc32c_public_vectors(data, expected):
    assert reference_crc32c(data) == expected
    assert tfrecord.crc32c(data) == expected


def test_crc32c_matches_definition_on_random_data():
    rng = random.Random(0)
    for n in (0, 1, 7, 8, 100, 1000):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert tfrecord.crc32c(data) == reference_crc32c(data)


def mask(c: int) -> int:  # TensorFlow's masking, written out
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_frame_bytes_by_hand():
    payload = b"123456789"
    length = struct.pack("<Q", 9)
    assert length == b"\x09\x00\x00\x00\x00\x00\x00\x00"
    expected = (
        length + struct.pack("<I", mask(reference_crc32c(length))) + payload + struct.pack("<I", mask(0xE3069283))
    )
    assert tfrecord.frame(payload) == expected
    assert tfrecord.masked_crc32c(payload) == mask(0xE3069283)


def test_example_bytes_by_hand():
    # Example{features: Features{feature: {"a": Feature{bytes_list: BytesList{value: ["x"]}}}}}
    bytes_list = b"\x0a\x01x"  # field 1, length 1, "x"
    feature = b"\x0a\x03" + bytes_list  # Feature.bytes_list = 1
    entry = b"\x0a\x01a" + b"\x12\x05" + feature  # map entry: key = 1, value = 2
    features = b"\x0a\x0a" + entry  # Features.feature = 1
    example = b"\x0a\x0c" + features  # Example.features = 1
    assert tfrecord.encode_example({"a": [b"x"]}) == example
    assert tfrecord.parse_example(example) == {"a": ("bytes", [b"x"])}
    # A packed int64 list: 300 = varint ac 02, -1 = ten bytes ff..ff 01.
    ints = tfrecord.encode_example({"n": [300, -1]})
    assert b"\x0a\x0c\xac\x02" + b"\xff" * 9 + b"\x01" in ints
    assert tfrecord.parse_example(ints) == {"n": ("int64", [300, -1])}


def test_round_trip_and_spec_decoding(tmp_path):
    spec = {
        "inputs_pretokenized": {"dtype": "string", "shape": []},
        "inputs": {"dtype": "int32", "shape": [None]},
        "answer_choices": {"dtype": "string", "shape": [None]},
        "weight": {"dtype": "float32", "shape": []},
        "is_correct": {"dtype": "bool", "shape": []},
    }
    rows = [
        {
            "inputs_pretokenized": ["héllo ✓"],
            "inputs": [5, 6, 1],
            "answer_choices": ["yes", "no"],
            "weight": [0.5],
            "is_correct": [1],
        },
        {"inputs_pretokenized": [""], "inputs": [], "answer_choices": [], "weight": [1.0], "is_correct": [0]},
    ]
    path = tmp_path / "train.tfrecord-00000-of-00001"
    assert tfrecord.write_records(path, (tfrecord.encode_example(r) for r in rows)) == 2
    f = tfrecord.TFRecordFile(path)
    assert f.count() == 2
    got = []
    for _, payload in f.records():
        feats = tfrecord.parse_example(payload)
        got.append({n: tfrecord.decode_feature(n, spec[n], *feats[n]) for n in spec})
    assert got == [
        {
            "inputs_pretokenized": "héllo ✓",
            "inputs": [5, 6, 1],
            "answer_choices": ["yes", "no"],
            "weight": 0.5,
            "is_correct": True,
        },
        {"inputs_pretokenized": "", "inputs": [], "answer_choices": [], "weight": 1.0, "is_correct": False},
    ]
    assert [i for i, _ in f.records(range(1, 5))] == [1]


def test_corruption_is_named(tmp_path):
    path = tmp_path / "x.tfrecord"
    tfrecord.write_records(path, [b"first", b"second record"])
    data = bytearray(path.read_bytes())
    second = 12 + 5 + 4
    data[second + 12 + 2] ^= 0xFF  # a byte inside the second payload
    path.write_bytes(bytes(data))
    with pytest.raises(tfrecord.TFRecordError, match=rf"{path}: record 1 \(byte offset {second}\): data CRC mismatch"):
        list(tfrecord.TFRecordFile(path).records())
    path.write_bytes(bytes(data[: second + 6]))  # truncated inside the second header
    with pytest.raises(tfrecord.TFRecordError, match="record 1.*truncated header"):
        tfrecord.TFRecordFile(path).count()
    path.write_bytes(random.Random(1).randbytes(64))
    with pytest.raises(tfrecord.TFRecordError, match="record 0.*length CRC mismatch"):
        tfrecord.TFRecordFile(path).count()
