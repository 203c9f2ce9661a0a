"""The T0 tokenizer path (bigscience/T0_3B: T5's SentencePiece model, 32000 pieces + 100 sentinels
= 32100 ids), with a SentencePiece model trained here and saved the way T0's repository stores it
(spiece.model, tokenizer_config.json, special_tokens_map.json; no tokenizer.json)."""

import io
import json
import random

import pytest
from conftest import TRAIN_CONFIGS, local_args, make_dump

from data_prep import tokenizer as toklib
from data_prep.manifest import load_split, load_tokenizer, read_manifest

PIECES = 1000
EXTRA = [f"<extra_id_{i}>" for i in range(100)]
TEXTS = [
    "glue_mrpc_equivalent train sentence number 3 says yes ?",
    "Hypothesis: the cat sat.  Is it true?",
    "Naïve café: $1,234.50\nnew line",
    toklib.PROBE,
]


@pytest.fixture(scope="module")
def t0_like(tmp_path_factory):
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(3000)] + TEXTS * 5
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=PIECES,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    d = tmp_path_factory.mktemp("t0_like")
    (d / "spiece.model").write_bytes(model.getvalue())
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": EXTRA}
    (d / "special_tokens_map.json").write_text(json.dumps(specials))
    (d / "tokenizer_config.json").write_text(
        json.dumps({**specials, "extra_ids": 100, "model_max_length": 512, "tokenizer_class": "T5Tokenizer"})
    )
    return d


def test_slow_and_fast_loads_agree_with_sentencepiece(t0_like, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    reference = spm.SentencePieceProcessor(model_file=str(t0_like / "spiece.model"))
    slow = toklib.load_hf_tokenizer(str(t0_like), use_fast=False)
    fast = toklib.load_hf_tokenizer(str(t0_like), use_fast=True)
    fast.save_pretrained(str(tmp_path / "saved"))  # now with tokenizer.json
    from_json = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    for tok in (slow, fast, from_json):
        assert len(tok) == PIECES + 100  # T0_3B: 32000 + 100 = 32100
        assert tok.convert_tokens_to_ids("<extra_id_0>") == PIECES + 99  # sentinels count down from the top
        assert tok.convert_tokens_to_ids("<extra_id_99>") == PIECES
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        assert [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]] == [
            reference.encode(t) for t in TEXTS[:2]
        ]
        enc = toklib.Encoder.for_tokenizer(tok, 512, 512)
        assert enc.ids(TEXTS) == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    ids = {toklib.info(t, "x", "hf").sha256 for t in (slow, fast, from_json)}
    assert len(ids) == 1


def test_prep_records_the_t0_identity(t0_like, tmp_path, run):
    dump = make_dump(tmp_path / "dump")
    args = local_args(dump, tmp_path / "out")
    args[args.index("--tokenizer") + 1] = str(t0_like)
    assert run(args) == 0
    m = read_manifest(tmp_path / "out")
    slow = toklib.load_hf_tokenizer(str(t0_like), use_fast=False)
    assert m.tokenizer == {
        "name_or_path": str(t0_like),
        "kind": "hf",
        "vocab_size": PIECES + 100,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "sha256": toklib.info(slow, "x", "hf").sha256,
    }
    tok = load_tokenizer(tmp_path / "out")
    row = load_split(tmp_path / "out", "train")[0]
    assert row["target_ids"][-1] == 1 and tok.decode(row["input_ids"]).startswith(TRAIN_CONFIGS[0])
