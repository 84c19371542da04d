"""`exaone-data train-tokenizer`: sample the corpus, train SuperBPE, write tokenizer files, compare
with plain BPE."""

from __future__ import annotations

import logging
import os
import sys
import time
import unicodedata
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from data_tools import superbpe
from data_tools.progress import human_bytes, on_terminal
from data_tools.readers import BadRecord, InputFile, iter_records, parse_record, resolve_inputs
from megatron_exaone.files import write_json_atomic

log = logging.getLogger("exaone_data")

ROLES = ("pad", "bos", "eos", "eod", "unk")
DEFAULT_SPECIAL_TOKENS = (
    "pad=[PAD]",
    "bos=[BOS]",
    "eos=[EOS]",
    "eod=<|endoftext|>",
    "[|system|]",
    "[|user|]",
    "[|assistant|]",
    "[|endofturn|]",
)
HELDOUT_BYTES_PER_GROUP = 8 << 20


@dataclass
class TrainTokenizerConfig:
    inputs: Sequence[str | os.PathLike]
    output: str | os.PathLike
    vocab_size: int
    # vocabulary size where stage 2 starts; default stage1_fraction * vocab
    transition_point: int | None = None
    stage1_fraction: float = 0.8
    pretokenizer: str = "superbpe-default"
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS
    max_bytes: int = 1 << 30  # text sampled for stage 1 (held-out text included)
    # stage 2 keeps every windowed pretoken in memory: sample less
    stage2_max_bytes: int = 256 << 20
    heldout_fraction: float = 0.1
    max_words: int = 4
    text_field: str = "text"
    group_field: str = "lang"  # per-language report; the input file's name when the field is absent
    show_progress: bool = True


def parse_special_tokens(entries: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Tokens in id order and their roles, from entries like "eos=[EOS]" or "[|user|]"."""
    tokens, roles = [], {}
    for entry in entries:
        role, sep, token = entry.partition("=")
        if not (sep and role in ROLES):
            role, token = "", entry
        if not token or token in tokens:
            raise ValueError(f"special token {entry!r} is empty or repeated")
        if role:
            if role in roles:
                raise ValueError(f"two special tokens have the role {role!r}")
            roles[role] = token
        tokens.append(token)
    return tokens, roles


def stage_sizes(cfg: TrainTokenizerConfig, num_special: int) -> superbpe.StageSizes:
    floor = num_special + 256
    t = (
        cfg.transition_point
        if cfg.transition_point is not None
        else round(cfg.stage1_fraction * cfg.vocab_size)
    )
    if not floor < t <= cfg.vocab_size:
        raise ValueError(
            f"transition point {t} must lie in ({floor}, {cfg.vocab_size}]: above the "
            f"{num_special} special tokens + 256 byte tokens and at most --vocab-size"
        )
    return superbpe.StageSizes(cfg.vocab_size, t)


@dataclass
class Reading:
    """What one pass over the sample read. The cap is not the corpus size: the log says both."""

    option: str  # the command-line option that sets the cap
    cap: int
    bytes: int = 0
    documents: int = 0
    trained_bytes: int = 0  # `bytes` less the held-out documents
    capped: bool = False

    def describe(self) -> str:
        read = f"read {human_bytes(self.bytes)} of text in {self.documents:,} documents"
        extent = (
            f"capped by {self.option} {human_bytes(self.cap)}: the inputs hold more than that"
            if self.capped
            else "all of the inputs"
        )
        return f"{read}, {extent}; trained on {human_bytes(self.trained_bytes)}"


class Sample:
    """Documents read round-robin from the inputs up to a byte budget, split into training and
    held-out text.

    Held out: every k-th document of each group (k = 1 / heldout_fraction), so every language is
    measured. Iterating again yields the same documents.
    """

    def __init__(self, inputs: list[InputFile], cfg: TrainTokenizerConfig) -> None:
        self.inputs, self.cfg = inputs, cfg
        self.every = round(1 / cfg.heldout_fraction) if cfg.heldout_fraction > 0 else 0
        self.heldout: dict[str, list[str]] = defaultdict(list)
        self.heldout_bytes: dict[str, int] = defaultdict(int)
        self.skipped = 0

    def _documents(self, report_bad: bool) -> Iterator[tuple[str, str, int]]:
        streams = [(iter_records([inp], self.cfg.text_field), inp) for inp in self.inputs]
        while streams:
            for pair in list(streams):
                stream, inp = pair
                try:
                    _, line, payload = next(stream)
                except StopIteration:
                    streams.remove(pair)
                    continue
                try:
                    text, size, obj = parse_record(payload, self.cfg.text_field)
                except BadRecord as e:
                    if report_bad:
                        self.skipped += 1
                        log.warning("%s:%d: skipped: %s", inp.path, line, e)
                    continue
                group = str((obj or {}).get(self.cfg.group_field) or inp.path.name.split(".")[0])
                yield group, text, size

    def training_texts(self, reading: Reading, collect_heldout: bool = False) -> Iterator[str]:
        """The training documents among the first `reading.cap` bytes read (held-out documents
        count too); `reading` records what was read."""
        seen: dict[str, int] = defaultdict(int)
        for group, text, size in self._documents(report_bad=collect_heldout):
            if reading.bytes >= reading.cap:
                reading.capped = True  # a document beyond the cap exists
                return
            reading.bytes += size
            reading.documents += 1
            seen[group] += 1
            if self.every and seen[group] % self.every == 0:
                if collect_heldout and self.heldout_bytes[group] < HELDOUT_BYTES_PER_GROUP:
                    self.heldout[group].append(unicodedata.normalize("NFC", text))
                    self.heldout_bytes[group] += size
                continue
            reading.trained_bytes += size
            yield text


def compare(
    baseline: Tokenizer, superbpe_tok: Tokenizer, heldout: dict[str, list[str]]
) -> list[dict]:
    """Bytes per token of both tokenizers on held-out text, per group and overall."""
    superwords = {i for t, i in superbpe_tok.get_vocab().items() if superbpe.is_superword(t)}
    rows, totals = [], defaultdict(int)
    for group in sorted(heldout):
        texts = heldout[group]
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        base = sum(len(e.ids) for e in baseline.encode_batch_fast(texts, add_special_tokens=False))
        encs = superbpe_tok.encode_batch_fast(texts, add_special_tokens=False)
        sb = sum(len(e.ids) for e in encs)
        sw = sum(1 for e in encs for i in e.ids if i in superwords)
        row = {
            "group": group,
            "bytes": nbytes,
            "bpe_tokens": base,
            "superbpe_tokens": sb,
            "superword_tokens": sw,
        }
        rows.append(row)
        for k, v in row.items():
            if k != "group":
                totals[k] += v
    if rows:
        rows.append(dict(totals, group="all"))
    for row in rows:
        row["bpe_bytes_per_token"] = row["bytes"] / max(row["bpe_tokens"], 1)
        row["superbpe_bytes_per_token"] = row["bytes"] / max(row["superbpe_tokens"], 1)
        row["token_reduction"] = 1 - row["superbpe_tokens"] / max(row["bpe_tokens"], 1)
    return rows


def _check_round_trip(tok: Tokenizer, heldout: dict[str, list[str]]) -> None:
    for group, texts in heldout.items():
        for text, enc in zip(texts, tok.encode_batch_fast(texts, add_special_tokens=False)):
            if tok.decode(enc.ids, skip_special_tokens=False) != text:
                raise RuntimeError(
                    f"the trained tokenizer does not round-trip a held-out {group} document; "
                    "please report this with the tokenizer.json"
                )


def write_tokenizer(tok: Tokenizer, out: Path, roles: dict[str, str], extra: list[str]) -> None:
    """tokenizer.json plus the config transformers' AutoTokenizer / PreTrainedTokenizerFast read."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        **{f"{role}_token": token for role, token in roles.items() if role != "eod"},
    }
    if extra:
        config["extra_special_tokens"] = extra
    if "eod" in roles:  # read by `exaone-data tokenize`; not a transformers field
        config["eod_token"] = roles["eod"]
    write_json_atomic(out / "tokenizer_config.json", config)


def train_tokenizer(cfg: TrainTokenizerConfig) -> dict:
    """Run both stages and write DIR/tokenizer.json, tokenizer_config.json and
    superbpe_report.json."""
    if cfg.pretokenizer not in superbpe.PRETOKENIZERS:
        raise ValueError(
            f"unknown pretokenizer {cfg.pretokenizer!r}; choose {', '.join(superbpe.PRETOKENIZERS)}"
        )
    specials, roles = parse_special_tokens(cfg.special_tokens)
    sizes = stage_sizes(cfg, len(specials))
    stage1_regex, stage2_regex = superbpe.PRETOKENIZERS[cfg.pretokenizer]
    inputs = resolve_inputs(cfg.inputs)
    sample = Sample(inputs, cfg)
    out = Path(cfg.output)
    # The trainer's bar draws on stderr but ends each phase with a blank line on stdout.
    bars = cfg.show_progress and on_terminal(sys.stdout, sys.stderr)

    log.info(
        "stage 1: byte-level BPE to %d tokens (pretokenizer %s) from %d input file(s) of %s on "
        "disk, reading at most %s of text (--max-bytes)",
        sizes.vocab_size,
        cfg.pretokenizer,
        len(inputs),
        human_bytes(sum(i.size for i in inputs)),
        human_bytes(cfg.max_bytes),
    )
    started, reading1 = time.monotonic(), Reading("--max-bytes", cfg.max_bytes)
    baseline = superbpe.train_stage1(
        sample.training_texts(reading1, collect_heldout=True),
        stage1_regex,
        sizes.vocab_size,
        specials,
        bars,
    )
    log.info("stage 1: %s, %.1f s", reading1.describe(), time.monotonic() - started)
    full_vocab, full_merges = superbpe.bpe_state(baseline)
    if len(full_vocab) < sizes.vocab_size:
        log.warning(
            "the sample only supports %d BPE tokens (asked %d): give more text or a smaller "
            "vocabulary",
            len(full_vocab),
            sizes.vocab_size,
        )
    t = min(sizes.transition_point, len(full_vocab))
    vocab1, merges1 = superbpe.truncate(full_vocab, full_merges, t, len(specials))

    log.info(
        "stage 2: %d superword merges after transition point %d, reading at most %s of text "
        "(--stage2-max-bytes)",
        sizes.vocab_size - t,
        t,
        human_bytes(cfg.stage2_max_bytes),
    )
    started, reading2 = time.monotonic(), Reading("--stage2-max-bytes", cfg.stage2_max_bytes)
    merges2 = superbpe.train_stage2(
        vocab1,
        merges1,
        sample.training_texts(reading2),
        stage2_regex,
        sizes.vocab_size - t,
        cfg.max_words,
        specials,
        bars,
    )
    log.info("stage 2: %s, %.1f s", reading2.describe(), time.monotonic() - started)
    vocab, merges = superbpe.assemble(vocab1, merges1, merges2, sizes.vocab_size)
    if len(vocab) < sizes.vocab_size:
        log.warning(
            "stage 2 found only %d new tokens (asked %d): the sample is too small",
            len(vocab) - t,
            sizes.vocab_size - t,
        )
    tok = superbpe.byte_level_tokenizer(stage2_regex, vocab, merges, specials)
    _check_round_trip(tok, sample.heldout)
    write_tokenizer(tok, out, roles, [s for s in specials if s not in roles.values()])

    rows = compare(baseline, tok, sample.heldout)
    report = {
        "pretokenizer": cfg.pretokenizer,
        "vocab_size": len(vocab),
        "baseline_vocab_size": len(full_vocab),
        "transition_point": t,
        "stage2_tokens": len(vocab) - t,
        "superwords_in_vocab": sum(superbpe.is_superword(tok_) for tok_ in vocab),
        "max_words_per_token": max(superbpe.word_count(tok_) for tok_ in vocab),
        "special_tokens": specials,
        "roles": roles,
        "skipped_records": sample.skipped,
        "text_read": {"stage1": asdict(reading1), "stage2": asdict(reading2)},
        "inputs": [str(i) for i in cfg.inputs],
        "heldout": rows,
    }
    write_json_atomic(out / "superbpe_report.json", report)
    log.info(
        "wrote %s (%d tokens, %d superwords)",
        out / "tokenizer.json",
        len(vocab),
        report["superwords_in_vocab"],
    )
    return report


def format_report(report: dict) -> str:
    """The held-out comparison as a plain table."""
    lines = [
        f"held-out bytes/token: SuperBPE ({report['vocab_size']} tokens, transition point "
        f"{report['transition_point']}) vs stage-1-only BPE ({report['baseline_vocab_size']} "
        "tokens)",
        f"{'group':<10}{'bytes':>10}{'BPE b/t':>10}{'SuperBPE b/t':>14}"
        f"{'fewer tokens':>14}{'superword tok':>15}",
    ]
    for r in report["heldout"]:
        lines.append(
            f"{r['group']:<10}{r['bytes']:>10}{r['bpe_bytes_per_token']:>10.3f}"
            f"{r['superbpe_bytes_per_token']:>14.3f}{r['token_reduction']:>13.1%}"
            f"{r['superword_tokens'] / max(r['superbpe_tokens'], 1):>15.1%}"
        )
    return "\n".join(lines)
