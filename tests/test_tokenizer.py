"""SentencePiece tokenizers trained on real shards of English, Chinese, Arabic and emoji captions, and the BPE path."""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import unicodedata
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import _build_text_tower
from PIL import Image

from clipalign.config import ConfigError
from clipalign.data.shards import ShardStream, expand_urls
from clipalign.data.writer import brace_pattern, write_shards
from clipalign.layout import TOKENIZER_FILE
from clipalign.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    directory_tokenizer,
    load_tokenizer,
    recipe_tokenizer,
    tokenize,
)
from clipalign.train_tokenizer import main, train_sentencepiece

VOCAB = 512  # byte fallback alone takes 256 pieces, and every kept character one more

_WORDS = {
    "en": (("a red car", "two dogs", "a small cat", "an old man", "A woman", "three birds", "a wooden boat"),
           ("sitting on", "running across", "parked near", "looking at", "flying over"),
           ("the street", "a green field", "the beach", "a snowy mountain", "the river at sunset")),
    "zh": (("一只猫", "两只狗", "红色的汽车", "一个老人", "一位女士", "三只鸟"),
           ("坐在", "跑过", "停在", "看着"),
           ("街道上", "绿色的田野里", "海滩上", "雪山旁边", "河边")),
    "ar": (("قطة صغيرة", "كلبان", "سيارة حمراء", "رجل عجوز", "امرأة"),
           ("تجلس على", "يركض عبر", "متوقفة بجانب"),
           ("الشارع", "حقل أخضر", "الشاطئ", "النهر")),
}
_EMOJI = ("🐱", "🐶", "🚗", "🌅", "🌊", "🔥", "😀")
_SPACE = {"en": " ", "zh": "", "ar": " "}
# never in the training captions: they must come back through byte fallback, not as <unk>
_UNSEEN = ["鲸鱼在海里 🦄", "Ελληνικά and 한국어 🦖🧬", "قطة 🐱 تحت المطر ☔"]


def _caption(rng: random.Random) -> str:
    lang = rng.choice(list(_WORDS))
    text = _SPACE[lang].join(rng.choice(words) for words in _WORDS[lang])
    return f"{text} {rng.choice(_EMOJI)}" if rng.random() < 0.4 else text


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


# three kinds of fault, four samples: two undecodable, two without a caption
BAD_SAMPLES = [
    {"txt": b"\xff\xfe\xfa not utf-8"},
    {"json": b"{not json"},
    {},
    {"txt": "   "},
]
SKIPPED = {"bad_text": 2, "no_caption": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, int]:
    """Shards of 400 samples (.txt, .json caption, .json captions list) plus the bad ones; (spec, good captions)."""
    rng, image = random.Random(0), _jpeg()
    samples, captions = [], 0
    for i in range(400):
        sample = {"__key__": f"{i:06d}", "jpg": image}
        if i % 10 == 0:
            sample["json"] = {"captions": [_caption(rng) for _ in range(3)], "label": 1}
            captions += 3
        elif i % 3 == 0:
            sample["json"] = {"caption": _caption(rng)}
            captions += 1
        else:
            sample["txt"] = _caption(rng)
            captions += 1
        samples.append(sample)
    for j, bad in enumerate(BAD_SAMPLES):
        samples.insert(50 + 100 * j, {"__key__": f"bad{j}", "jpg": image, **bad})
    shards = write_shards(samples, tmp_path_factory.mktemp("shards"), samples_per_shard=150)
    return brace_pattern(shards), captions


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, dict]:
    """A unigram and a BPE model trained on the corpus: kind -> summary."""
    out = tmp_path_factory.mktemp("tokenizers")
    return {kind: train_sentencepiece(corpus[0], out / f"{kind}.model", vocab_size=VOCAB, model_type=kind)
            for kind in ("unigram", "bpe")}


@pytest.fixture(params=["unigram", "bpe"])
def tok(request, trained) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(trained[request.param]["output"])


def test_training_reads_every_caption_and_counts_bad_samples(corpus, trained):
    spec, captions = corpus
    for kind, summary in trained.items():
        assert summary["captions"] == captions  # every entry of a "captions" list, not one drawn at random
        assert summary["skipped"] == SKIPPED
        assert summary["model_type"] == kind and summary["files"] == 3
        assert 256 < summary["pieces"] <= VOCAB and summary["vocab_size"] == summary["pieces"] + 3
        sidecar = json.loads(Path(summary["sidecar"]).read_text(encoding="utf-8"))
        assert Path(summary["sidecar"]).name == f"{kind}.json"
        assert {k: sidecar[k] for k in ("vocab_size", "model_type", "captions", "sources", "skipped")} == {
            "vocab_size": summary["vocab_size"], "model_type": kind, "captions": captions, "sources": spec,
            "skipped": SKIPPED}
        assert 0 < summary["mean_tokens"] < 40 and summary["truncated_fraction"] == 0


def test_rows_are_sot_pieces_eot_then_padding(tok):
    texts = ["a red car parked near the beach", "一只猫坐在海滩上", "قطة صغيرة تجلس على الشارع 🐱", ""]
    ids = tok(texts)
    assert ids.shape == (4, 77) and ids.dtype == torch.long
    assert tok.vocab_size == tok.pieces + 3 and tok.eot_token_id == tok.vocab_size - 1
    assert tok.sot_token_id == tok.vocab_size - 2 and tok.pad_token_id == 0
    for row in ids:
        eot = int((row == tok.eot_token_id).nonzero().squeeze())
        assert row[0] == tok.sot_token_id and row.argmax() == eot
        assert (row[1:eot] > 0).all() and (row[1:eot] < tok.sot_token_id).all()
        assert (row[eot + 1:] == 0).all()
    assert (ids[3, :2] == torch.tensor([tok.sot_token_id, tok.eot_token_id])).all()  # empty text
    assert torch.equal(tok("a red car"), tokenize(tok, "a red car"))


def test_long_text_is_truncated_keeping_eot(tok):
    long = " ".join(["a red car parked near the beach 一只猫 🐱"] * 40)
    full = tok(long, context_length=1000)[0]
    n = int((full == tok.eot_token_id).nonzero().squeeze()) + 1
    assert n > 77
    row = tok(long)[0]
    assert row[-1] == tok.eot_token_id and row.argmax() == 76 and (row > 0).all()
    assert torch.equal(row[:76], full[:76])
    assert tok([long] * 3, context_length=20).shape == (3, 20)
    assert tok(long, context_length=20)[0, -1] == tok.eot_token_id


@pytest.mark.parametrize("text", ["一只猫坐在街道上", "سيارة حمراء متوقفة بجانب النهر", "🐶 🔥 🌊", *_UNSEEN,
                                  "A Woman   looking at\tthe River", "ﬁve ｆｕｌｌ-width ①"])
def test_decode_round_trips_after_normalisation(tok, text):
    ids = tok(text)[0]
    assert 1 not in ids.tolist()  # SentencePiece's <unk>: byte fallback spells anything unseen in bytes
    assert tok.decode(ids) == unicodedata.normalize("NFKC", " ".join(text.split()))


def test_case_is_kept_and_white_space_collapsed(tok):
    assert torch.equal(tok("  A Woman \t looking\n at "), tok("A Woman looking at"))
    assert not torch.equal(tok("A Woman"), tok("a woman"))


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match=r"outside this tokenizer's range"):
        tok.decode([tok.sot_token_id, tok.vocab_size, tok.eot_token_id])
    with pytest.raises(ValueError, match="one row"):
        tok.decode(tok(["a", "b"]))


def test_pickle_and_save_carry_the_model_not_only_its_path(trained, tmp_path):
    path = tmp_path / "moved.model"
    shutil.copy(trained["unigram"]["output"], path)
    tok = SentencePieceTokenizer(path, context_length=32)
    blob = pickle.dumps(tok)
    path.unlink()  # a worker on another machine need not see the file
    clone = pickle.loads(blob)
    texts = ["a small cat sitting on the street 😀", "两只狗跑过河边", *_UNSEEN]
    assert torch.equal(clone(texts), tok(texts))
    assert (clone.vocab_size, clone.context_length, clone.model_file) == (tok.vocab_size, 32, path)
    saved = clone.save(tmp_path / "tokenizer.model")  # the bytes it carries, though its own file is gone
    assert saved.read_bytes() == Path(trained["unigram"]["output"]).read_bytes()
    assert torch.equal(SentencePieceTokenizer(saved, context_length=32)(texts), tok(texts))


def test_load_tokenizer_picks_the_kind(trained, tmp_path):
    model = trained["bpe"]["output"]
    for spec in (model, Path(model)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, SentencePieceTokenizer) and tok.context_length == 77
    assert load_tokenizer(model, context_length=16)("a red car").shape == (1, 16)
    unsuffixed = tmp_path / "tokenizer-file"
    shutil.copy(model, unsuffixed)
    assert isinstance(load_tokenizer(str(unsuffixed)), SentencePieceTokenizer)  # an existing file is a model
    bpe = load_tokenizer("ViT-B-32")
    assert not isinstance(bpe, SentencePieceTokenizer)
    assert torch.equal(bpe(["a photo of a cat"]), build_tokenizer("ViT-B-32")(["a photo of a cat"]))
    assert load_tokenizer("ViT-B-32", context_length=16)("a cat").shape == (1, 16)


def test_recipe_and_directory_tokenizers(trained, tmp_path):
    model = trained["bpe"]["output"]
    spm = recipe_tokenizer("ViT-B-32", model)
    assert isinstance(spm, SentencePieceTokenizer) and spm.context_length == 77  # the model config's
    assert recipe_tokenizer("ViT-B-32", model, context_length=24).context_length == 24
    bpe = recipe_tokenizer("ViT-B-32", "", context_length=16)
    assert torch.equal(bpe(["a cat"]), build_tokenizer("ViT-B-32", context_length=16)(["a cat"]))
    assert all(isinstance(tok, Tokenizer) for tok in (spm, bpe, build_tokenizer("ViT-B-32")))
    with pytest.raises(ConfigError, match="model.tokenizer 'nowhere.txt': expected a SentencePiece .model file"):
        recipe_tokenizer("ViT-B-32", "nowhere.txt")
    with pytest.raises(FileNotFoundError, match=f"copy {TOKENIZER_FILE} with the encoder's files"):
        directory_tokenizer(tmp_path, {"context_length": 16}, sentencepiece=True)
    shutil.copy(model, tmp_path / TOKENIZER_FILE)
    tok = directory_tokenizer(tmp_path, {"context_length": 16}, sentencepiece=True)
    assert isinstance(tok, SentencePieceTokenizer) and tok.context_length == 16
    assert torch.equal(tok(["a red car"]), SentencePieceTokenizer(model, context_length=16)(["a red car"]))
    assert directory_tokenizer(tmp_path, {}, sentencepiece=False)(["a cat"]).shape == (1, 77)  # open_clip's BPE


def test_open_clip_bpe_path_is_unchanged():
    tok = build_tokenizer("ViT-B-32")
    ids = tokenize(tok, "a photo of a cat")
    assert ids.shape == (1, 77) and torch.equal(ids, open_clip.tokenize(["a photo of a cat"]))
    assert ids[0, 0] == 49406 and ids[0].argmax() == 6 and ids[0, 6] == 49407
    assert build_tokenizer("ViT-B-32", context_length=10)(["x " * 50])[0, -1] == 49407


def test_bad_model_files_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "tok.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(str(missing))
    garbage = tmp_path / "garbage.model"
    garbage.write_text("this is a text file, not a model\n")
    with pytest.raises(ValueError, match=rf"{garbage} is not a SentencePiece model.*expected a \.model file"):
        load_tokenizer(garbage)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{empty} is empty"):
        SentencePieceTokenizer(empty)
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        load_tokenizer(str(Path(__file__)))  # an existing file is taken for a model, and refused as one


def test_max_samples_caps_the_captions(corpus, tmp_path):
    summary = train_sentencepiece(corpus[0], tmp_path / "capped.model", vocab_size=VOCAB, max_samples=120)
    assert summary["captions"] == 120
    assert json.loads((tmp_path / "capped.json").read_text(encoding="utf-8"))["captions"] == 120


def test_text_files_tables_and_unreadable_shards(corpus, tmp_path):
    rng = random.Random(1)
    lines = [_caption(rng).encode() for _ in range(60)]
    (tmp_path / "captions.txt").write_bytes(b"\n".join([*lines[:30], b"", b"\xc3\x28 broken", *lines[30:]]) + b"\n")
    rows = [_caption(rng) for _ in range(40)]
    with open(tmp_path / "table.csv", "w", encoding="utf-8", newline="") as f:
        f.write("id,title\n" + "".join(f'{i},"{c}, with a comma"\n' for i, c in enumerate(rows)) + "40,\n")
    (tmp_path / "table.tsv").write_text("title\tid\n" + "".join(f"{c}\t{i}\n" for i, c in enumerate(rows)))
    (tmp_path / "broken.tar").write_bytes(b"not a tar file at all" * 50)
    spec = "::".join(str(tmp_path / name) for name in ("captions.txt", "table.csv", "table.tsv", "broken.tar"))
    summary = train_sentencepiece(spec, tmp_path / "mixed.model", vocab_size=VOCAB, caption_key="title")
    assert summary["captions"] == 60 + 40 + 40
    assert summary["skipped"] == {"bad_text": 1, "no_caption": 1, "unreadable_tar": 1}
    with pytest.raises(ValueError, match=r"table\.csv has no caption column 'caption'; its columns are \['id', 'title"):
        train_sentencepiece(spec, tmp_path / "nocol.model", vocab_size=VOCAB)


def test_training_errors_name_the_problem(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing-0000\.tar"):
        train_sentencepiece(f"{tmp_path}/missing-{{0000..0002}}.tar", tmp_path / "t.model")
    with pytest.raises(ValueError, match="no tokenizer training data"):
        train_sentencepiece(" ", tmp_path / "t.model")
    with pytest.raises(ValueError, match=r"must end in \.model"):
        train_sentencepiece(corpus[0], tmp_path / "t.bin")
    with pytest.raises(ValueError, match=r"vocab_size 100 is too small .* need \d+"):
        train_sentencepiece(corpus[0], tmp_path / "t.model", vocab_size=100)
    bad = [{"__key__": f"b{i}", "jpg": _jpeg(), **sample} for i, sample in enumerate(BAD_SAMPLES)]
    empty = write_shards(bad, tmp_path, prefix="bad")
    with pytest.raises(ValueError, match=r"no usable caption .*bad_text': 2"):
        train_sentencepiece(str(empty[0]), tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists() and not (tmp_path / "t.json").exists()


def test_cli_writes_model_and_sidecar(corpus, tmp_path, capsys):
    out = tmp_path / "cli" / "tok.model"
    main(["--data", corpus[0], "--output", str(out), "--vocab-size", str(VOCAB), "--model-type", "bpe",
          "--max-samples", "300"])
    printed = capsys.readouterr().out
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["captions"] == 300
    assert "on 300 captions from 3 files" in printed and "tokens per caption: mean" in printed
    assert "truncated at 77: 0.00%" in printed and f"model.tokenizer={out}" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path / "absent.tar"), "--output", str(out)])
    assert exit_info.value.code == 2 and "absent.tar" in capsys.readouterr().err


def test_ids_feed_an_open_clip_text_tower_pooled_at_eot(trained):
    tok = SentencePieceTokenizer(trained["unigram"]["output"], context_length=16)
    tower = _build_text_tower(embed_dim=32, text_cfg=dict(context_length=16, vocab_size=tok.vocab_size, width=32,
                                                          heads=2, layers=1, output_tokens=True)).eval()
    ids = tok(["a red car", "一只猫坐在街道上", "قطة صغيرة 🐱", " ".join(["two dogs running across"] * 10)])
    eot = (ids == tok.eot_token_id).int().argmax(dim=-1)
    assert eot.tolist()[-1] == 15 and torch.equal(ids.argmax(dim=-1), eot)
    with torch.no_grad():
        pooled, tokens = tower(ids)  # (4, 32), (4, 16, 32)
    assert pooled.shape == (4, 32) and tokens.shape == (4, 16, 32)
    torch.testing.assert_close(pooled, tokens[torch.arange(4), eot] @ tower.text_projection)


def test_stream_batches_carry_sentencepiece_ids(corpus, trained):
    tok = load_tokenizer(trained["unigram"]["output"], context_length=24)
    stream = ShardStream(expand_urls(corpus[0]), tok, image_size=16, batch_size=8, resampled=False, shuffle_buffer=0)
    batch = next(iter(stream))
    assert batch["texts"].shape == (8, 24) and (batch["texts"][:, 0] == tok.sot_token_id).all()
    assert (batch["texts"].argmax(dim=-1) == (batch["texts"] == tok.eot_token_id).int().argmax(dim=-1)).all()
