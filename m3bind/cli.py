"""The ``m3bind`` command line: embed, index, search, classify, info.

Every command calls the Python API only. User errors (unreadable files, unknown modalities, a library
built with another model) end with exit code 2 and one readable line on stderr; any other failure
with exit code 1 and one line; never a traceback. ``--json`` prints machine-readable results on stdout.

File names are patient data: unless the user passes ``--keep-names``, no input's path or file name is
printed, written or stored (inputs are named by their content's SHA-256, ``sha256:`` and 16 hex digits,
which ``sha256sum`` finds again; names in messages become "the file"), as ``m3bind.batch`` does.

Only what a command needs is imported, and only when it runs: ``--help`` and argument errors answer at
once, without torch, faiss or the model.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError, MissingFileError
from .modalities import get_modality, modality_names

PROG = "m3bind"
_LIST_REFUSED = 20  # refused files listed one by one in the human-readable summary


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        result = args.run(args)
        if result is not None:
            print(json.dumps(result, indent=2, default=str) if args.json else _text(result))
        return 0
    except InputError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # one line, no traceback: the CLI's promise
        return _fail(f"{type(exc).__name__}: {exc}", 1)
    finally:
        warnings.showwarning = previous


def build_parser() -> argparse.ArgumentParser:
    """Every command and option (cheap: nothing heavy is imported to build it)."""
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)  # accepted after the command too, without overriding
    parser = argparse.ArgumentParser(
        prog=PROG, description="Embed, index, search and classify medical images and ECGs in one shared space.")
    _global_options(parser, None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    embed = commands.add_parser("embed", parents=[common], help="embed files or folders into .npy + .jsonl",
                                description="Embed every file under the given files and folders. Writes "
                                            "OUTPUT.npy (N x D float32) and OUTPUT.jsonl (one item per row).")
    _input_options(embed)
    embed.add_argument("-o", "--output", required=True, type=Path, help="output prefix (OUTPUT.npy, OUTPUT.jsonl)")
    embed.set_defaults(run=_embed)

    index = commands.add_parser("index", parents=[common], help="build or extend a library from files/folders",
                                description="Add every file under the given files and folders to a library "
                                            "folder (created if missing, saved as the run goes on). Files already "
                                            "in it are skipped, so an interrupted run resumes where it stopped.")
    _input_options(index)
    index.add_argument("-l", "--library", required=True, type=Path, help="library folder")
    index.add_argument("--label", help="the label of every item added now (with --labels-csv: of those the CSV "
                                       "does not list)")
    index.add_argument("--labels-csv", type=Path, metavar="FILE",
                       help="labels of the items added now: a CSV of file,label rows (a header row 'file,label' "
                            "is allowed; a folder labels every file under it; relative paths are read from the "
                            "CSV's folder), matched to the inputs by content")
    index.add_argument("--no-skip-existing", dest="skip_existing", action="store_false",
                       help="embed files again even if the library already holds them")
    index.set_defaults(run=_index)

    search = commands.add_parser("search", parents=[common], help="search a library by text or by a file",
                                 description="Find the library items closest to a finding written as text, "
                                             "or to a file (--file).")
    search.add_argument("query", nargs="?", help="the finding to look for, e.g. 'pleural effusion'")
    search.add_argument("-f", "--file", type=Path, help="search with this file instead of text")
    search.add_argument("-l", "--library", required=True, type=Path, help="library folder")
    search.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    search.add_argument("--modality", action="append", choices=modality_names(), metavar="MODALITY",
                        help="only these modalities (repeatable)")
    search.add_argument("--exclude-modality", action="append", choices=modality_names(), metavar="MODALITY",
                        help="leave these modalities out (repeatable; cross-modal search)")
    search.add_argument("--per-modality", action="store_true",
                        help="the best of each modality, merged by score (default: the plain ranking of the "
                             "shared space)")
    search.set_defaults(run=_search)

    classify = commands.add_parser("classify", parents=[common], help="zero-shot classify one file",
                                   description="Probabilities of candidate findings for one file (a WFDB "
                                               "record: give its .hea). Without labels, the modality's "
                                               "default findings are used.")
    classify.add_argument("file", type=Path)
    classify.add_argument("labels", nargs="*", help="candidate findings, e.g. pneumonia 'pleural effusion'")
    classify.add_argument("--modality", choices=modality_names(), metavar="MODALITY",
                          help=f"override the detected modality ({', '.join(modality_names())})")
    classify.set_defaults(run=_classify)

    info = commands.add_parser("info", parents=[common], help="describe the model (and a library)",
                               description="Model name, fingerprint, modalities and dimension; with "
                                           "--library, that library's statistics.")
    info.add_argument("-l", "--library", type=Path, help="library folder")
    info.set_defaults(run=_info)
    return parser


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    flag_default = False if default is None else default
    parser.add_argument("--model", default=default,
                        help="model folder or Hugging Face repo id (default: the embedded default model)")
    parser.add_argument("--device", default=default, help="cpu, cuda, cuda:1, ... (default: a GPU if present)")
    parser.add_argument("--json", action="store_true", default=flag_default, help="print machine-readable JSON")
    parser.add_argument("--keep-names", action="store_true", default=flag_default,
                        help="print, write and store the inputs' paths and file names (they may carry patient "
                             "names; default: inputs are named by the SHA-256 of their content)")


def _input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="files and folders (searched recursively)")
    parser.add_argument("--modality", choices=modality_names(), metavar="MODALITY",
                        help="treat every input as this modality instead of detecting it")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per encoder batch (default 64)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: from the CPU count)")


# ------------------------------------------------------------------------------------------ commands
def _embed(args: argparse.Namespace) -> dict[str, Any] | None:
    import numpy as np

    from .batch import embed_files

    result = embed_files(_model(args), args.inputs, args.modality, args.batch_size, args.workers,
                         progress=sys.stderr.isatty(), keep_names=args.keep_names)
    if not result.primary:
        return None
    _check_any(result, args)
    prefix = args.output.with_suffix("") if args.output.suffix in (".npy", ".jsonl") else args.output
    npy, jsonl = Path(f"{prefix}.npy"), Path(f"{prefix}.jsonl")
    np.save(npy, result.embeddings)
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in result.items))
    return {"embedded": len(result.items), "dim": int(result.embeddings.shape[1]), "embeddings": str(npy),
            "items": str(jsonl), "refused": _refused(result.refused)}


def _index(args: argparse.Namespace) -> dict[str, Any] | None:
    from .batch import embed_files
    from .library import Library

    labels = _read_labels_csv(args.labels_csv, args.keep_names) if args.labels_csv is not None else {}
    model = _model(args)
    exists = args.library.exists()
    library = Library.load(args.library, model.fingerprint) if exists else Library.for_model(model)
    with library:
        labelling = _Labelling(library, labels, args.label)
        result = embed_files(model, args.inputs, args.modality, args.batch_size, args.workers, library=labelling,
                             skip_existing=args.skip_existing, progress=sys.stderr.isatty(),
                             keep_names=args.keep_names, save_to=args.library)
        if not result.primary:
            return None
        if not result.skipped:
            _check_any(result, args)
        return {"library": str(args.library), "added": len(result.items), "labelled": labelling.labelled,
                "skipped": len(result.skipped), "refused": _refused(result.refused), "stats": library.stats()}


def _search(args: argparse.Namespace) -> dict[str, Any]:
    if (args.query is None) == (args.file is None):
        raise InputError("Give either a text query or --file FILE, not both.")
    if args.k < 1:
        raise InputError("-k must be at least 1.")
    from .library import Library
    from .search import search

    sample = _read(args.file, None, args.keep_names) if args.file is not None else None
    model = _model(args)
    with Library.load(args.library, model.fingerprint) as library:
        hits = search(library, model, sample if sample is not None else args.query, args.k, modality=args.modality,
                      exclude_modality=args.exclude_modality, per_modality=args.per_modality)
    query = _input_name(args.file, args.keep_names) if args.file is not None else args.query
    return {"query": query, "hits": [_hit(h, args.keep_names) for h in hits]}


def _classify(args: argparse.Namespace) -> dict[str, Any]:
    sample = _read(args.file, args.modality, args.keep_names)  # a bad file fails before the slow model load
    model = _model(args)
    labels = args.labels or list(get_modality(model.route(sample).modality).default_labels)
    probs = model.classify(sample, labels)
    return {"file": _input_name(args.file, args.keep_names), "modality": sample.modality,
            "probabilities": dict(sorted(probs.items(), key=lambda kv: -kv[1]))}


def _info(args: argparse.Namespace) -> dict[str, Any]:
    from .library import Library

    model = _model(args)
    out = {"model": model.config.name, "fingerprint": model.fingerprint, "dim": model.dim,
           "modalities": model.modalities, "device": str(model.device)}
    if args.library is not None:
        with Library.load(args.library, model.fingerprint) as library:
            out["library"] = {"path": str(args.library), **library.stats()}
    return out


# ------------------------------------------------------------------------------------------- labels
class _Labelling:
    """The library as ``embed_files`` fills it, giving each item it adds the user's label: the CSV's label
    of the input with the item's SHA-256, else ``default``. Matching by content needs no file name."""

    def __init__(self, library: Any, by_sha256: dict[str, str], default: str | None):
        self.library, self.by_sha256, self.default = library, by_sha256, default
        self.labelled = 0

    def add(self, embeddings: Any, items: Sequence[dict[str, Any]]) -> list[int]:
        labelled = [{**item, "label": self.by_sha256.get(item["sha256"], self.default)} for item in items]
        self.labelled += sum(item["label"] is not None for item in labelled)
        return self.library.add(embeddings, labelled)

    def __getattr__(self, name: str) -> Any:  # everything but ``add`` (check_model, sha256s, save) is the library's
        return getattr(self.library, name)


def _read_labels_csv(path: Path, keep_names: bool) -> dict[str, str]:
    """SHA-256 of each input the CSV names (every input under a folder it names) -> its label."""
    from .inputs import collect_inputs, input_sha256

    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise MissingFileError(f"Cannot read the labels CSV: {exc.strerror or exc}.") from None
    except (UnicodeDecodeError, csv.Error):
        raise InputError("The labels CSV is not a readable UTF-8 CSV file.") from None
    if rows and [c.strip().lower() for c in rows[0]] == ["file", "label"]:
        rows = rows[1:]
    labels: dict[str, str] = {}
    for number, row in enumerate(rows, 1):
        if not any(c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"Row {number} of the labels CSV is not 'file,label'.")
        target = path.parent / row[0].strip()
        records, refused = collect_inputs(target) if target.exists() else ([], [])
        if not records and not refused:
            shown = f" ({target})" if keep_names else ""
            raise MissingFileError(f"Row {number} of the labels CSV names no existing file or folder{shown}.")
        labels.update((input_sha256(record), row[1].strip()) for record in records)
    return labels


# ------------------------------------------------------------------------------------------- helpers
def _model(args: argparse.Namespace) -> Any:
    import torch

    from .model import load_model

    device = args.device
    if device is None and "LOCAL_RANK" in os.environ:  # under torchrun: one GPU per local rank
        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise InputError(f"Unknown device {device!r}; use cpu, cuda or cuda:N.") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise InputError("No CUDA GPU is available here; use --device cpu.")
    return load_model(args.model, device=device or "auto")


def _read(path: Path, modality: str | None, keep_names: bool) -> Any:
    """The sample of one input file; a refusal names no file unless names are kept."""
    from .readers import load_input

    try:
        return load_input(path, modality)
    except InputError as exc:
        if keep_names:
            raise
        from .inputs import collect_inputs, refusal

        records, _ = collect_inputs(path)
        reason = refusal(records[0] if records else (path,), None, 0, str(exc), type(exc).__name__, False).reason
        raise type(exc)(reason) from None


def _input_name(path: Path, keep_names: bool) -> str:
    """How an input given on the command line is shown: as ``m3bind.batch`` names inputs in its reports."""
    from .inputs import collect_inputs, input_sha256, name_input

    records, _ = collect_inputs(path)
    record = records[0] if records else (path,)
    return name_input(record, None if keep_names else input_sha256(record), keep_names, 0)


def _hit(hit: Any, keep_names: bool) -> dict[str, Any]:
    """A search hit as printed: a stored file name only where the user asks for names."""
    out = dataclasses.asdict(hit)
    if not keep_names:
        out["source"] = None
    return out


def _check_any(result: Any, args: argparse.Namespace) -> None:
    """Nothing embedded is a user error: say why, in one line."""
    if result.items:
        return
    if not result.refused:
        where = ", ".join(str(p) for p in args.inputs) if args.keep_names else "the given inputs"
        raise InputError(f"No files found in {where}.")
    first = result.refused[0]
    more = f" ({len(result.refused) - 1} more inputs refused)" if len(result.refused) > 1 else ""
    raise InputError(f"{first.source}: {first.reason}{more}")


def _refused(refused: list[Any]) -> list[dict[str, str]]:
    return [r._asdict() for r in refused]


def _text(result: dict[str, Any]) -> str:
    """The human-readable form of a command's result."""
    if "hits" in result:
        rows = [f"{h['score']:7.3f}  {h['modality']:<10}  {_hit_name(h)}" + (f"  [{h['label']}]" if h["label"] else "")
                for h in result["hits"]]
        return "\n".join([f"{len(rows)} results for {result['query']!r}", *rows])
    if "probabilities" in result:
        title = get_modality(result["modality"]).title
        return "\n".join([f"{result['file']} ({title})",
                          *(f"{100 * p:6.1f}%  {label}" for label, p in result["probabilities"].items())])
    if "fingerprint" in result:
        lines = [f"model:       {result['model']}", f"fingerprint: {result['fingerprint']}",
                 f"dimension:   {result['dim']}", f"device:      {result['device']}",
                 f"modalities:  {', '.join(result['modalities'])}"]
        if "library" in result:
            lib = result["library"]
            per = ", ".join(f"{m} {n}" for m, n in lib["per_modality"].items()) or "empty"
            lines += [f"library:     {lib['path']}: {lib['count']} items ({per}), index {lib['index']}"]
        return "\n".join(lines)
    if "added" in result:
        stats = result["stats"]
        per = ", ".join(f"{m} {n}" for m, n in stats["per_modality"].items()) or "empty"
        head = (f"Added {result['added']} items to {result['library']} ({result['labelled']} labelled, "
                f"{result['skipped']} already there, {len(result['refused'])} refused); it now holds "
                f"{stats['count']} ({per}).")
    else:
        head = (f"Embedded {result['embedded']} inputs into {result['embeddings']} ({result['embedded']} x "
                f"{result['dim']}) and {result['items']} ({len(result['refused'])} refused).")
    return "\n".join([head, *_refused_lines(result["refused"])])


def _hit_name(hit: dict[str, Any]) -> str:
    if hit["source"]:
        return hit["source"]
    return f"sha256:{hit['sha256'][:16]}" if hit["sha256"] else "-"


def _refused_lines(refused: list[dict[str, str]]) -> list[str]:
    if not refused:
        return []
    lines = ["Refused:", *(f"  {r['source']}: {r['reason']}" for r in refused[:_LIST_REFUSED])]
    if len(refused) > _LIST_REFUSED:
        lines.append(f"  ... and {len(refused) - _LIST_REFUSED} more (see --json for all)")
    return lines


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code
