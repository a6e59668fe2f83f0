"""Commands about data: corpus list, corpus get, prepare.

The corpus and prepare modules are imported inside the commands, so that loading the command line
for another command (sample, say), or for --help, never loads them (nor numpy, nor torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table
from typing_extensions import Annotated

from charlm.cli.app import app, corpus_app, err, friendly
from charlm.cli.stop import SignalsEnd
from charlm.errors import CharlmError
from charlm.terminal import PipeConsole, shown

if TYPE_CHECKING:
    from rich.progress import Progress

    from charlm.data import corpus

MIRROR_ENV = "CHARLM_CORPUS_MIRROR"  # also in charlm.data.corpus; named here for the help text without importing it
# charlm.tokenizers.spm.KINDS, named here for the help text without importing numpy (tests/test_options.py compares them).
TOKENIZER_KINDS = ("char", "spm-char", "bpe", "unigram")


def _bytes_progress(description: str) -> Progress:
    from rich.progress import (  # 8 ms: when a corpus is fetched
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn(description),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


# -- corpus ---------------------------------------------------------------------------------
@corpus_app.command("list")
@friendly
def corpus_list():
    """List the registered corpora and whether each is present locally."""
    from charlm.data import corpus

    entries = corpus.registry()  # a bad registry file: its one-line error, nothing before it
    where, why = corpus.corpora_location()
    err.print(
        f"corpora dir: {where} ({why}; set with --corpora-dir DIR or ${corpus.CORPORA_ENV})", soft_wrap=True, highlight=False
    )
    table = Table("name", "size", "present", "get from", "description", "license")
    for entry in entries.values():
        d = corpus.describe(entry)
        table.add_row(d["name"], f"{d['bytes']:,} B", "yes" if d["present"] else "no", d["get"], d["description"], d["license"])
    PipeConsole().print(table)


@corpus_app.command("get")
@friendly
def corpus_get(
    name: Annotated[str, typer.Argument(help="A registered corpus name (see: charlm corpus list).")],
    mirror: Annotated[Optional[Path], typer.Option(help=f"Local mirror dir with NAME/input.txt; default ${MIRROR_ENV}.")] = None,
    source: Annotated[
        Optional[Path],
        typer.Option("--from", help="Build it from a kernel source tree or tarball (.tar.xz/.tar.gz/.tar), read as a stream."),
    ] = None,
    subset: Annotated[
        Optional[str], typer.Option(help="With --from: only these paths of the tree, e.g. kernel,mm (default: the corpus's own).")
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out", "-o", help="With --from: write here instead of CORPORA/NAME/input.txt (needed for a custom --subset)."
        ),
    ] = None,
):
    """Fetch a corpus into CORPORA/NAME/input.txt (the corpora dir: see charlm corpus list) from a mirror or its URL (or build it --from a tree), verifying its sha256."""
    from charlm.data import corpus

    if source is None and (subset is not None or out is not None):
        raise CharlmError("--subset and --out go with --from PATH (building from a source tree)")
    if source is not None and mirror is not None:
        raise CharlmError("give either --from PATH (build) or --mirror DIR (copy), not both")
    with SignalsEnd("corpus get"), _bytes_progress("{task.description}") as bar:
        task = bar.add_task(f"get {name}", total=None)
        if source is None:
            got = corpus.fetch(name, mirror=mirror, progress=lambda done, total: bar.update(task, completed=done, total=total))
        else:
            update = lambda phase, done, total: bar.update(task, description=f"{name}: {phase}", completed=done, total=total)  # noqa: E731
            got = corpus.build(name, source, subset=subset, out=out, progress=update)
    err.print(_corpus_report(name, got), soft_wrap=True)


def _corpus_report(name: str, got: corpus.Fetched) -> str:
    """What `corpus get` did, in one line: where the file is, how it got there, what was verified."""
    from charlm.data import corpus

    made = f" built from {got.origin}: {got.files:,} files, {got.bytes:,} bytes" if got.files is not None else ""
    if got.origin == "already present":
        made = " (already present)"
    if got.verified:
        return f"{name}: {shown(got.path)}{made} (sha256 verified)"
    if not got.registered:
        return f"{shown(got.path)}{made}, sha256 {got.sha256} (a custom --subset: no registered checksum to compare)"
    expected = corpus.lookup(name).bytes
    size = "matches" if got.bytes == expected else "DIFFERS from"
    sha = f"sha256 {got.sha256}, which" if got.sha256 else "its sha256"
    return (
        f"{name}: {shown(got.path)}{made}; {sha} could not be verified: the registry has no published sha256 "
        f"for {name}. Its size {size} the registered {expected:,} bytes"
    )


# -- prepare --------------------------------------------------------------------------------
TokenizerOpt = Annotated[
    Optional[str],
    typer.Option(
        help=f"{', '.join(TOKENIZER_KINDS)}: one id per character (default), or a SentencePiece model trained on the training "
        "split (spm-char: characters with byte fallback; bpe, unigram: subwords). Figures stay in bits per character.",
        show_default=False,
    ),
]
VocabSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--vocab-size",
        help="SentencePiece pieces besides the 256 byte pieces (default: 1024 for bpe and unigram; spm-char: as many as the coverage keeps).",
        show_default=False,
    ),
]
CoverageOpt = Annotated[
    Optional[float],
    typer.Option(
        help="SentencePiece: share of the training characters that get a piece of their own; rarer ones are spelled in bytes (default: 0.9995).",
        show_default=False,
    ),
]


@app.command()
@friendly
def prepare(
    input: Annotated[str, typer.Argument(help="A text file, a directory (see --glob) or a registered corpus name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dir for meta.json and train/val/test.bin.")],
    glob: Annotated[
        Optional[str], typer.Option(help="For a directory: files to include, e.g. '**/*.[ch]' (sorted by path).")
    ] = None,
    encoding: Annotated[
        str, typer.Option(help="utf-8 (characters), or bytes (a byte-level vocabulary for non-UTF-8 files).")
    ] = "utf-8",
    split: Annotated[str, typer.Option(help="train,val,test fractions of the text, in order.")] = "0.9,0.05,0.05",
    mirror: Annotated[Optional[Path], typer.Option(help="Corpus mirror dir, for corpus names.")] = None,
    tokenizer: TokenizerOpt = None,
    vocab_size: VocabSizeOpt = None,
    character_coverage: CoverageOpt = None,
    vocab_from: Annotated[
        Optional[Path],
        typer.Option(
            metavar="CKPT",
            show_default=False,
            help="Encode with this checkpoint's vocabulary, to fine-tune it (train DIR --init-from CKPT): every old id kept, the text's new characters appended; a SentencePiece tokenizer is kept as it is.",
        ),
    ] = None,
):
    """Encode a text into token ids for training: DIR/meta.json plus train.bin, val.bin, test.bin."""
    from charlm.api.training import prepare as prepare_text
    from charlm.data import PreparedData

    with SignalsEnd("prepare"):  # SIGTERM, SIGHUP: the work dir goes, an earlier OUT stays as it was
        done = prepare_text(
            input,
            out,
            glob=glob,
            encoding=encoding,
            split=split,
            mirror=mirror,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            vocab_from=vocab_from,
            progress=True,
        )
    meta = PreparedData(done).meta
    s = meta["splits"]
    kind, size = meta["tokenizer"]["kind"], meta["vocab_size"]
    pieces = "" if kind in ("char", "bytes") else f" ({kind}: {size - 256} pieces + 256 bytes)"
    err.print(
        f"prepared {meta['source']['chars']:,} characters from {len(meta['source']['paths'])} file(s) in {meta['seconds']:.1f}s: "
        f"vocabulary {size}{pieces}, train {s['train']['tokens']:,} / "
        f"val {s['val']['tokens']:,} / test {s['test']['tokens']:,} tokens -> {shown(out)}",
        soft_wrap=True,
    )
