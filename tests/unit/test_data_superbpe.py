"""SuperBPE tokenizer training: a stock tokenizer.json that round-trips, holds superwords and beats
plain BPE."""

import json
import unicodedata

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from data_tools import superbpe
from data_tools.cli import main
from data_tools.sample_corpus import files
from data_tools.train_tokenizer import TrainTokenizerConfig, parse_special_tokens, train_tokenizer

TEXTS = [
    "안녕하세요. 오늘은 김치찌개를 끓이는 방법을 알려 드리겠습니다.",
    "日本語の文章です。東京は晴れ、気温は２５度でした。",
    "Tiếng Việt có nhiều dấu: ă, â, ê, ô, ơ, ư và đ.",
    "Größere Übungen für Äpfel und Öl, straße.",
    "El niño comió piñas en la mañana, ¿verdad? ¡Sí!",
    "In the middle of the night: the cat sat on the mat, and then it left.",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇰🇷 mixed with text",
    "def f(x):\n\treturn {'a': x ** 2}  # comment\n\n\nclass A:\n    pass\n",
    "x" * 5000 + " " + "가" * 3000,
    "",
    " leading and trailing spaces   \n\n  ",
    "control \x00\x01\x7f bytes, zero-width\u200b joiner, private use \ue000",
]


@pytest.fixture(scope="module", params=["superbpe-default", "k-exaone"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    report = train_tokenizer(
        TrainTokenizerConfig(
            inputs=files(),
            output=out,
            vocab_size=4000,
            pretokenizer=request.param,
            show_progress=False,
        )
    )
    return out, report


def test_tokenizer_json_is_stock_superbpe_layout(trained):
    out, report = trained
    spec = json.loads((out / "tokenizer.json").read_text())
    assert spec["normalizer"] == {"type": "NFC"}
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated"
    assert split["pattern"]["Regex"] == superbpe.PRETOKENIZERS[report["pretokenizer"]][1]
    assert byte_level == {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": False,
    }
    assert spec["decoder"]["type"] == "ByteLevel" and spec["model"]["type"] == "BPE"
    assert len(spec["model"]["vocab"]) == 4000 == report["vocab_size"]
    specials, _ = parse_special_tokens(report["special_tokens"])
    assert [spec["model"]["vocab"][t] for t in specials] == list(range(len(specials)))
    # Stage-1 merges first: they are exactly the first merges of the plain BPE baseline.
    stage1 = report["transition_point"] - len(specials) - 256
    assert report["stage2_tokens"] == 4000 - report["transition_point"] == 800
    merges = [tuple(m) for m in spec["model"]["merges"]]
    assert not any(superbpe.is_superword(a + b) for a, b in merges[:stage1])
    assert any(superbpe.is_superword(a + b) for a, b in merges[stage1:])


def test_round_trip_stock_and_transformers(trained):
    out, _ = trained
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    fast = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert fast.eos_token == "[EOS]" and fast.pad_token_id == 0 and fast.bos_token_id == 1
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert fast.encode(text, add_special_tokens=False) == ids
        assert fast.decode(ids) == text
    nfd = unicodedata.normalize("NFD", "한국어 Việt")
    assert tok.decode(tok.encode(nfd).ids) == unicodedata.normalize("NFC", nfd)


def test_superword_rules_and_gain(trained):
    out, report = trained
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab()
    decoded = [
        bytes(superbpe.BYTE_DECODER[c] for c in t).decode("utf-8", "replace")
        for t in vocab
        if not t.startswith("[") and not t.startswith("<|")
    ]
    superwords = [t for t in decoded if " " in t.strip()]
    assert len(superwords) == report["superwords_in_vocab"] > 50
    assert not any(": " in t for t in decoded)
    assert max(superbpe.word_count(t) for t in vocab) <= 4
    overall = report["heldout"][-1]
    assert overall["group"] == "all" and overall["superword_tokens"] > 0
    assert overall["superbpe_bytes_per_token"] > overall["bpe_bytes_per_token"]
    assert {r["group"] for r in report["heldout"]} == {
        "ko",
        "en",
        "es",
        "de",
        "ja",
        "vi",
        "code",
        "all",
    }


def test_cli_prints_per_language_comparison(tmp_path, capsys):
    assert (
        main(
            [
                "train-tokenizer",
                "--input",
                *map(str, files(["en", "ko"])),
                "--vocab-size",
                "1000",
                "--output",
                str(tmp_path),
                "--no-progress",
                "--pretokenizer",
                "k-exaone",
                "--special-tokens",
                "pad=<pad>",
                "eos=</s>",
                "<|user|>",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "SuperBPE" in table and "\nen " in table and "\nko " in table and "\nall " in table
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>" and config["pad_token"] == "<pad>"
    assert config["extra_special_tokens"] == ["<|user|>"]


def test_bad_settings_are_explained(tmp_path, caplog):
    with pytest.raises(ValueError, match="repeated"):
        parse_special_tokens(["eos=[EOS]", "[EOS]"])
    with pytest.raises(ValueError, match="two special tokens have the role 'eos'"):
        parse_special_tokens(["eos=a", "eos=b"])
    assert (
        main(
            [
                "train-tokenizer",
                "--input",
                str(files(["en"])[0]),
                "--vocab-size",
                "300",
                "--output",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 1
    )
    assert "transition point 240 must lie in (264, 300]" in caplog.text
