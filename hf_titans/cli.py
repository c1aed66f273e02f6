"""The ``hf-titans`` command line: teach, ask, chat, inspect and push memories. Thin over the library.

    hf-titans teach "The secret project code is Omega-99." --memory memories/omega
    hf-titans ask --memory memories/omega "The secret project code is"

Exit codes: 0 ok, 1 runtime failure, 2 bad input or usage, 130 interrupted (Ctrl-C).
Human-readable progress and messages go to stderr; results go to stdout (one JSON document with ``--json``).
Heavy imports (torch, transformers, datasets) happen only once the input has been checked, so bad input
fails in a fraction of a second and never touches the memory folder.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
FACT_FILE_TYPES = (".txt", ".jsonl", ".ndjson", ".csv", ".tsv")
DATASET_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
                         ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}


class CliError(Exception):
    """An error the user can fix (exit 2 by default) or a runtime failure (exit 1), with a clear message."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Output:
    """Where things are printed: results to stdout (JSON with ``--json``), everything else to stderr."""

    json: bool = False
    quiet: bool = False
    debug: bool = False

    @functools.cached_property
    def err(self):
        from rich.console import Console

        return Console(stderr=True, highlight=False, soft_wrap=True)

    @property
    def chatty(self) -> bool:
        return not (self.json or self.quiet)

    def info(self, message: str) -> None:
        if self.chatty:
            self.err.print(message)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"[yellow]warning:[/yellow] {message}")

    def result(self, data: dict[str, Any], text: str | None = None) -> None:
        if self.json:
            print(json.dumps({"ok": True, **data}, ensure_ascii=False, default=_json_default), flush=True)
        elif text is not None:
            print(text, flush=True)

    def error(self, message: str, code: int) -> None:
        from rich.markup import escape

        self.err.print(f"[bold red]error:[/bold red] {escape(message)}")
        if self.json:
            print(json.dumps({"ok": False, "error": message, "exit_code": code}, ensure_ascii=False), flush=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


# ---------------------------------------------------------------------------------------------- the app
app = typer.Typer(
    name="hf-titans",
    help="Teach a frozen Hugging Face causal LM new facts at test time with a small neural memory (a sidecar).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages: only errors and answers.")]
MemoryOpt = Annotated[Path, typer.Option("--memory", "-m", help="The memory folder (created if new).",
                                         show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="Base model: a local folder or a Hub id. Default: the memory's own base model, or the "
                    "embedded SmolLM2-135M-Instruct for a new memory.", show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="A YAML preset (e.g. configs/fast-teach.yaml) for a new memory.", show_default=False)]
MismatchOpt = Annotated[bool, typer.Option(
    "--ignore-base-mismatch", help="Load a memory onto a base model other than the one it was made for.")]


def _state(ctx: typer.Context, json_output: bool = False, quiet: bool = False) -> Output:
    out = ctx.find_object(Output) or Output()
    out.json = out.json or json_output
    out.quiet = out.quiet or quiet
    return out


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(__version__)
        raise typer.Exit(EXIT_OK)


@app.callback()
def _main(ctx: typer.Context, json_output: JsonOpt = False, quiet: QuietOpt = False,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and library warnings.")] = False,
          version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                                callback=_print_version)] = False) -> None:
    ctx.obj = Output(json=json_output, quiet=quiet, debug=debug)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _command(func: Callable) -> Callable:
    """Run a command, turning errors into a message and an exit code (never a traceback unless --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx") or next(a for a in args if isinstance(a, typer.Context))
        out = _state(ctx, kwargs.get("json_output", False), kwargs.get("quiet", False))
        if not out.debug:
            import warnings

            warnings.filterwarnings("ignore")
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except CliError as err:
            out.error(str(err), err.code)
            raise typer.Exit(err.code) from None
        except KeyboardInterrupt:
            out.error("interrupted", EXIT_INTERRUPTED)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as err:  # a runtime failure: say what and where, traceback with --debug
            if out.debug:
                import traceback

                traceback.print_exc()
            out.error(f"{type(err).__name__}: {err}" + ("" if out.debug else " (run with --debug for the traceback)"),
                      EXIT_FAILURE)
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper


# ---------------------------------------------------------------------------------------------- reading facts
def read_facts_file(path: Path, field: str = "text") -> list[str]:
    """Facts from a ``.txt`` (one per non-blank line), ``.jsonl`` (an object with ``field``, or a string per line)
    or ``.csv``/``.tsv`` (the column ``field``) file. Raises :class:`CliError` naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise CliError(f"facts file {str(path)!r} does not exist")
    if not path.is_file():
        raise CliError(f"facts file {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix not in FACT_FILE_TYPES:
        raise CliError(f"facts file {str(path)!r}: unsupported type {suffix or '(no extension)'!r}; use one of "
                       f"{', '.join(FACT_FILE_TYPES)} (or --dataset for other formats)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise CliError(f"facts file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise CliError(f"cannot read facts file {str(path)!r}: {err.strerror or err}") from None
    facts: list[str] = []
    if suffix == ".txt":
        facts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CliError(f"{path} line {lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            if isinstance(obj, dict):
                if field not in obj:
                    raise CliError(f"{path} line {lineno}: no field {field!r} (it has "
                                   f"{', '.join(map(repr, obj)) or 'no fields'}); choose the text field with --field")
                obj = obj[field]
            if not isinstance(obj, str):
                raise CliError(f"{path} line {lineno}: expected a string or an object with a string {field!r} "
                               f"field, got {type(obj).__name__}")
            if not obj.strip():
                raise CliError(f"{path} line {lineno}: the text is empty")
            facts.append(obj.strip())
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        columns = reader.fieldnames or []
        if columns and field not in columns:
            raise CliError(f"{path}: no column {field!r}; its columns are {', '.join(map(repr, columns))}. "
                           f"Choose one with --field")
        try:
            for row in reader:
                value = row.get(field)
                if value is None or not value.strip():
                    if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                        raise CliError(f"{path} line {reader.line_num}: the {field!r} cell is empty")
                    continue
                facts.append(value.strip())
        except csv.Error as err:
            raise CliError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None
    if not facts:
        raise CliError(f"facts file {str(path)!r} is empty: it holds no facts")
    return facts


def read_dataset(name: str, split: str = "train", field: str = "text", limit: int | None = None) -> list[str]:
    """Facts from the ``field`` column of a Hugging Face dataset (Hub name, local folder or data file)."""
    try:
        import datasets
    except ImportError:
        raise CliError("--dataset needs the `datasets` library: pip install 'hf_titans[datasets]' "
                       "(or pip install datasets)") from None
    if limit is not None:
        split = f"{split}[:{limit}]"
    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = DATASET_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise CliError(f"--dataset {name!r}: unsupported file type {path.suffix!r}; use one of "
                               f"{', '.join(DATASET_FILE_BUILDERS)}")
            if path.stat().st_size == 0:
                raise CliError(f"--dataset {name!r} is an empty file")
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            ds = datasets.load_dataset(builder, data_files=str(path), split=split, **extra)
        else:
            ds = datasets.load_dataset(name, split=split)
    except CliError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CliError(f"cannot load dataset {name!r} (split {split!r}): {err}") from None
    except Exception as err:  # e.g. a malformed data file (datasets wraps the parser's error)
        cause = err.__cause__ or err.__context__
        detail = f"{err}" + (f" ({cause})" if cause is not None else "")
        code = EXIT_USAGE if path.is_file() else EXIT_FAILURE
        raise CliError(f"cannot load dataset {name!r} (split {split!r}): {detail}", code) from None
    if field not in ds.column_names:
        raise CliError(f"dataset {name!r} has no column {field!r}; its columns are "
                       f"{', '.join(map(repr, ds.column_names))}. Choose one with --field")
    facts = []
    for i, value in enumerate(ds[field]):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if not isinstance(value, str):
            raise CliError(f"dataset {name!r} row {i}: column {field!r} holds {type(value).__name__}, not text")
        facts.append(value.strip())
    if not facts:
        raise CliError(f"dataset {name!r} (split {split!r}) has no non-empty {field!r} texts")
    return facts


def _check_text(text: str, what: str) -> None:
    """Command-line text with undecodable bytes arrives with lone surrogates: refuse it before loading a model."""
    from .reliability import check_unicode

    try:
        check_unicode(text, what)
    except ValueError as err:
        raise CliError(str(err)) from None


def collect_facts(facts: list[str] | None, files: list[Path] | None, field: str, dataset: str | None,
                  split: str, limit: int | None) -> list[str]:
    texts: list[str] = []
    for i, fact in enumerate(facts or []):
        if not fact.strip():
            raise CliError(f"fact {i + 1} on the command line is empty")
        _check_text(fact, f"fact {i + 1} on the command line")
        texts.append(fact.strip())
    for path in files or []:
        texts += read_facts_file(path, field)
    if dataset is not None:
        texts += read_dataset(dataset, split, field, limit)
    if not texts:
        raise CliError("nothing to teach: give facts as arguments, with --file FILE or with --dataset NAME")
    return texts


# ---------------------------------------------------------------------------------------------- memory folders
def _load_config(path: Path | None):
    from .config import MemoryConfig

    if path is None:
        return None
    try:
        return MemoryConfig.from_file(path)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise CliError(f"bad --config: {err}") from None


def _read_memory_config(memory: Path) -> dict[str, Any] | None:
    """The memory folder's validated ``config.json`` (see :func:`hf_titans.hub.parse_config`), ``None`` for a new
    (missing or empty) folder."""
    if not memory.exists():  # a save killed between its two renames left the memory beside its folder: put it back
        from .reliability import recover_interrupted_save

        recover_interrupted_save(memory)
    if memory.exists() and not memory.is_dir():
        raise CliError(f"--memory {str(memory)!r} is a file, not a memory folder")
    config_file = memory / "config.json"
    if not config_file.is_file():
        if memory.is_dir() and any(memory.iterdir()):
            raise CliError(f"{str(memory)!r} is not empty and is not a hf_titans memory (no config.json); "
                           f"give a new or empty folder, or an existing memory")
        return None
    from . import hub

    try:
        return hub.parse_config(config_file.read_text(encoding="utf-8"), str(config_file))
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"cannot read {config_file}: {err}") from None
    except (ValueError, TypeError) as err:
        raise CliError(f"{str(memory)!r} is not a usable hf_titans memory: {err}") from None


def _recorded_base_model(info: dict[str, Any]) -> str | None:
    return info["base_model"]["name_or_path"] or None


def _check_writable(memory: Path) -> None:
    """Fail before any work when the memory folder cannot be written (the save would fail at the end)."""
    if memory.exists() and not memory.is_dir():
        raise CliError(f"--memory {str(memory)!r} is a file, not a memory folder")
    probe = memory.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CliError(f"cannot create memory folder {str(memory)!r}: {str(probe)!r} is a file")
    try:
        fd, name = tempfile.mkstemp(prefix=".hf-titans-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise CliError(f"cannot write the memory folder {str(memory)!r}: {str(probe)!r} is not writable "
                       f"({err.strerror or err}); choose another --memory") from None


def _load_base(name: str | None):
    from .base_model import DEFAULT_MODEL, load_base_model

    if name is None or name == DEFAULT_MODEL:
        try:
            return load_base_model()
        except ImportError as err:
            raise CliError(f"{err}, or give a model with --model") from None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CliError(f"--model {name!r} is a file; give a model folder or a Hub model id")
        name = str(path.resolve())  # absolute, so the memory records a base model that works from any folder
    try:
        return load_base_model(name)
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load the base model {name!r}: {err}") from None


def _config_diff(a, b) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [k for k in da if da[k] != db.get(k)]


def open_engine(out: Output, memory: Path, model: str | None, config_path: Path | None = None,
                create: bool = False, ignore_base_mismatch: bool = False, from_hub: bool = False):
    """Load the memory in ``memory`` (or start a new one when ``create``) onto its base model.

    With ``from_hub``, a ``memory`` that is no local folder but looks like ``user/name`` is a Hub repo.

    Returns ``(engine, created)``.
    """
    config = _load_config(config_path)
    if from_hub and not memory.exists() and _looks_like_repo_id(str(memory)):
        return _open_hub_engine(out, str(memory), model, ignore_base_mismatch), False
    info = _read_memory_config(memory)
    if info is None and not create:
        raise CliError(f"no memory at {str(memory)!r}; create one with: hf-titans teach \"...\" --memory {memory}")
    if info is not None and config is not None and _config_diff(config, info["memory_config"]):
        raise CliError(f"{str(memory)!r} is an existing memory with its own config; --config applies only when "
                       f"creating one (they differ in {', '.join(_config_diff(config, info['memory_config']))}). "
                       f"Use a new --memory folder, or leave out --config")
    base = model if model is not None else (_recorded_base_model(info) if info is not None else None)
    start = time.perf_counter()
    with _status(out, f"loading base model {base or 'SmolLM2-135M-Instruct (embedded)'}"):
        base_model, tokenizer = _load_base(base)
    from .engine import HybridTitansEngine

    if info is None:
        engine = HybridTitansEngine(base_model, tokenizer, config)
        created = True
    else:
        try:
            engine = HybridTitansEngine.from_pretrained(base_model, str(memory), tokenizer=tokenizer,
                                                        ignore_base_mismatch=ignore_base_mismatch)
        except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
            raise CliError(f"cannot load the memory {str(memory)!r}: {_cli_words(err)}") from None
        created = False
    out.info(f"[dim]{'new' if created else 'loaded'} memory {memory} on {base or 'SmolLM2-135M-Instruct'} "
             f"({time.perf_counter() - start:.1f} s)[/dim]")
    return engine, created


def _cli_words(err: Exception) -> str:
    """A library message in the command line's terms (its keyword arguments are options here)."""
    return str(err).replace("ignore_base_mismatch=True", "--ignore-base-mismatch")


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _open_hub_engine(out: Output, repo_id: str, model: str | None, ignore_base_mismatch: bool):
    """A memory from a Hub repo (downloaded into the Hub cache), on ``model`` or the base model it records."""
    from . import hub
    from .engine import HybridTitansEngine

    try:
        with _status(out, f"downloading {repo_id}"):
            checkpoint = hub.load_checkpoint(repo_id)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(f"no local memory folder {repo_id!r}, and no usable Hub memory there: {err}") from None
    base = model if model is not None else (checkpoint.base_model["name_or_path"] or None)
    with _status(out, f"loading base model {base or 'SmolLM2-135M-Instruct (embedded)'}"):
        base_model, tokenizer = _load_base(base)
    try:
        engine = HybridTitansEngine.from_pretrained(base_model, repo_id, tokenizer=tokenizer,
                                                    ignore_base_mismatch=ignore_base_mismatch)
    except (ValueError, FileNotFoundError) as err:
        raise CliError(f"cannot load the memory {repo_id!r}: {_cli_words(err)}") from None
    out.info(f"[dim]loaded memory {repo_id} from the Hub on {base or 'SmolLM2-135M-Instruct'}[/dim]")
    return engine


@contextmanager
def _no_interrupt() -> Iterator[None]:
    """Hold Ctrl-C while a save runs (the save is atomic anyway; this just avoids an interrupted message)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def save_memory(out: Output, engine, memory: Path, save_log: bool = False) -> None:
    with _no_interrupt(), _status(out, f"saving {memory}"):
        try:
            engine.save_pretrained(str(memory), save_taught_log=save_log)
        except OSError as err:
            reason = err.strerror or str(err)
            if reason.startswith("cannot save the memory"):  # hf_titans.hub already said what and where
                raise CliError(reason, EXIT_FAILURE) from None
            raise CliError(f"cannot save the memory to {str(memory)!r}: {reason}; the folder is as "
                           f"it was before", EXIT_FAILURE) from None


@contextmanager
def _status(out: Output, message: str) -> Iterator[None]:
    if out.chatty and out.err.is_terminal:
        with out.err.status(message + " ..."):
            yield
    else:
        yield


def _folder_bytes(memory: Path) -> int:
    return sum(p.stat().st_size for p in memory.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- teach
@app.command()
@_command
def teach(
    ctx: typer.Context,
    facts: Annotated[Optional[list[str]], typer.Argument(help="Facts to teach, one per argument.",
                                                          show_default=False)] = None,
    memory: MemoryOpt = ...,
    file: Annotated[Optional[list[Path]], typer.Option(
        "--file", "-f", help="A .txt (one fact per line), .jsonl or .csv file of facts; repeatable.",
        show_default=False)] = None,
    field: Annotated[str, typer.Option("--field", help="The text field of .jsonl/.csv files and datasets.")] = "text",
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="A Hugging Face dataset (Hub name, local folder or data file); needs `datasets`.",
        show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="The dataset split.")] = "train",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Take at most this many dataset rows.",
                                                 show_default=False)] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", min=0, help="Update steps at most per fact (default: the memory's config).",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Facts written together (interleaved, so they do not overwrite each other); "
                                    "progress is shown after each batch.")] = 8,
    save_log: Annotated[bool, typer.Option(
        "--save-log", help="Also store the taught texts in the memory folder (they may be private).")] = False,
    ignore_base_mismatch: MismatchOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Teach facts into a new or existing memory folder (continues learning where it stopped) and save it."""
    out = _state(ctx, json_output, quiet)
    t0 = time.perf_counter()
    texts = collect_facts(facts, file, field, dataset, split, limit)
    _load_config(config)  # a bad preset fails before the model loads
    _check_writable(memory)
    engine, created = open_engine(out, memory, model, config, create=True, ignore_base_mismatch=ignore_base_mismatch)
    from .engine import TeachReport

    total = TeachReport()
    interrupted = False
    batches = range(0, len(texts), batch_size)
    for number, start in enumerate(batches, 1):
        batch = texts[start:start + batch_size]
        if len(batches) > 1:
            out.info(f"[bold]batch {number}/{len(batches)}[/bold]: facts {start + 1}-{start + len(batch)} "
                     f"of {len(texts)}")
        try:  # the engine's progress bar (tqdm, stderr) counts update rounds and shows the worst loss
            report = engine.teach(batch, max_steps=max_steps, progress=out.chatty)
        except KeyboardInterrupt:
            interrupted = True
            break
        except ValueError as err:  # e.g. a fact longer than the context window
            raise CliError(f"facts {start + 1}-{start + len(batch)}: {err}; nothing was saved") from None
        total.facts += report.facts
        total.seconds += report.seconds
        total.skipped_nonfinite += report.skipped_nonfinite
        for fact in report.facts:
            out.info(_fact_line(fact))
    if interrupted and not total.facts:
        out.error("interrupted before any fact was taught; the memory folder is as it was", EXIT_INTERRUPTED)
        raise typer.Exit(EXIT_INTERRUPTED)
    save_memory(out, engine, memory, save_log)
    data = {"command": "teach", "memory": str(memory), "created": created, "facts_given": len(texts),
            "taught": len(total.facts), "written": total.written, "skipped": total.skipped, "steps": total.steps,
            "teach_seconds": round(total.seconds, 3), "seconds": round(time.perf_counter() - t0, 3),
            "skipped_nonfinite": total.skipped_nonfinite, "interrupted": interrupted,
            "facts": [_fact_dict(f) for f in total.facts]}
    summary = (f"{'interrupted: ' if interrupted else ''}taught {len(total.facts)} of {len(texts)} facts: "
               f"{total.written} written, {total.skipped} skipped as unsurprising, {total.steps} update steps, "
               f"{total.seconds:.1f} s teaching ({data['seconds']:.1f} s in all). Saved {memory}"
               f"{' (new)' if created else ''}.")
    if out.json:
        out.result(data)
    elif not out.quiet:
        print(summary, flush=True)
    if total.skipped_nonfinite:
        out.warn(f"{total.skipped_nonfinite} update(s) had a non-finite surprise and were skipped")
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


# ---------------------------------------------------------------------------------------------- read (issue 8)
@app.command()
@_command
def read(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A UTF-8 text file of any length.", show_default=False)],
    memory: MemoryOpt = ...,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", min=1,
                                              help="Tokens per chunk (one forward pass each).")] = 512,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", min=0, help="Update steps at most per written chunk (default: the memory's config).",
        show_default=False)] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    save_log: Annotated[bool, typer.Option(
        "--save-log", help="Also store the written sentences in the memory folder (they may be private).")] = False,
    ignore_base_mismatch: MismatchOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Read a long document chunk by chunk into a new or existing memory; only surprising passages are written."""
    out = _state(ctx, json_output, quiet)
    t0 = time.perf_counter()
    if not file.is_file():
        raise CliError(f"{str(file)!r} is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CliError(f"{str(file)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise CliError(f"cannot read {str(file)!r}: {err.strerror or err}") from None
    if not text.strip():
        raise CliError(f"{str(file)!r} is empty; nothing to read")
    _load_config(config)  # a bad preset fails before the model loads
    _check_writable(memory)
    engine, created = open_engine(out, memory, model, config, create=True, ignore_base_mismatch=ignore_base_mismatch)
    try:  # Ctrl-C: engine.read restores the memory, nothing is saved, exit 130
        stats = engine.read(text, chunk_tokens=chunk_tokens, max_steps=max_steps, progress=out.chatty)
    except ValueError as err:
        raise CliError(f"{file}: {err}; nothing was saved") from None
    save_memory(out, engine, memory, save_log)
    data = {"command": "read", "memory": str(memory), "created": created, "file": str(file),
            **{k: v for k, v in stats.to_dict().items() if k != "chunks"}, "written": stats.spans_written,
            "chunk_surprise": stats.chunk_surprise, "seconds_total": round(time.perf_counter() - t0, 3)}
    if out.json:
        out.result(data)
    elif not out.quiet:
        print(f"{stats}\nSaved {memory}{' (new)' if created else ''}.", flush=True)


def _fact_line(fact) -> str:
    from rich.markup import escape

    tag = "[green]written[/green]" if fact.written else "[dim]skipped (unsurprising)[/dim]"
    text = fact.text if len(fact.text) <= 70 else fact.text[:67] + "..."
    return (f"  surprise {fact.surprise_before:6.3f} -> {fact.surprise_after:6.3f} nats  {fact.steps:3d} steps  "
            f"{tag}  {escape(repr(text))}")


def _fact_dict(fact) -> dict[str, Any]:
    return {"text": fact.text, "surprise_before": _finite(fact.surprise_before),
            "surprise_after": _finite(fact.surprise_after), "steps": fact.steps, "written": fact.written,
            "familiarity": _finite(fact.familiarity),
            "history": [_finite(v) for v in getattr(fact, "history", [])]}


# ---------------------------------------------------------------------------------------------- ask
@app.command()
@_command
def ask(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt to complete.", show_default=False)],
    memory: Annotated[Optional[Path], typer.Option(
        "--memory", "-m", help="The memory folder, or a Hub repo USER/NAME (may be left out with --no-memory).",
        show_default=False)] = None,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="The bare base model's answer, for comparison.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")] = 32,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0,
                                               help="0 decodes greedily; above 0 samples.")] = 0.0,
    model: ModelOpt = None,
    ignore_base_mismatch: MismatchOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Complete PROMPT with the memory (or, with --no-memory, with the bare base model)."""
    out = _state(ctx, json_output, quiet)
    if not prompt.strip():
        raise CliError("the prompt is empty")
    _check_text(prompt, "the prompt")
    t0 = time.perf_counter()
    if memory is None:
        if not no_memory:
            raise CliError("give the memory with --memory DIR (or --no-memory for the bare base model)")
        from .engine import HybridTitansEngine

        with _status(out, "loading base model"):
            base_model, tokenizer = _load_base(model)
        engine = HybridTitansEngine(base_model, tokenizer)
    else:
        engine, _ = open_engine(out, memory, model, ignore_base_mismatch=ignore_base_mismatch, from_hub=True)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
    streamed = stream and not out.json
    if streamed:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    t1 = time.perf_counter()
    try:
        answer = engine.generate(prompt, use_memory=not no_memory, **kwargs)
    except (ValueError, TypeError) as err:  # e.g. a prompt longer than the context window: bad input, exit 2
        raise CliError(f"cannot answer this prompt: {err}") from None
    seconds = time.perf_counter() - t1
    familiarity = engine.last_familiarity[0] if memory is not None else float("nan")
    spoke = (not no_memory) and memory is not None and familiarity >= engine.config.familiarity_threshold
    data = {"command": "ask", "memory": str(memory) if memory is not None else None, "prompt": prompt,
            "completion": answer, "use_memory": not no_memory, "memory_spoke": spoke,
            "familiarity": _finite(familiarity), "generate_seconds": round(seconds, 3),
            "seconds": round(time.perf_counter() - t0, 3)}
    if out.json:
        out.result(data)
    elif not streamed:
        print(answer, flush=True)
    if no_memory:
        out.info(f"[dim]bare base model (--no-memory); {seconds:.2f} s to generate[/dim]")
    else:
        out.info(f"[dim]memory {'spoke' if spoke else 'silent: the prompt is unfamiliar'} (familiarity "
                 f"{familiarity:.2f}); {seconds:.2f} s to generate[/dim]")


# ---------------------------------------------------------------------------------------------- chat
CHAT_HELP = "Commands: /save, /quit (or Ctrl-D / Ctrl-C: save and leave), /help."


@app.command()
@_command
def chat(
    ctx: typer.Context,
    memory: MemoryOpt = ...,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens per answer.")] = 64,
    no_learn: Annotated[bool, typer.Option("--no-learn", help="Answer only; never write the memory.")] = False,
    save_log: Annotated[bool, typer.Option("--save-log", help="Also store the learned texts in the folder.")] = False,
    ignore_base_mismatch: MismatchOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Talk with the model; the memory learns each surprising line and is saved when you leave."""
    out = _state(ctx, json_output, quiet)
    _load_config(config)
    if not no_learn:
        _check_writable(memory)
    engine, created = open_engine(out, memory, model, config, create=not no_learn,
                                  ignore_base_mismatch=ignore_base_mismatch)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes become lone surrogates, refused per line below
        sys.stdin.reconfigure(errors="surrogateescape")
    out.info(f"Chatting with memory {memory}. It learns from surprising lines. {CHAT_HELP}")
    changed = created and not no_learn
    turns = learned = 0
    try:
        while True:
            try:
                line = input("you> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and line == "":
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit", "/q"):
                break
            if line == "/help":
                out.info(CHAT_HELP)
                continue
            if line == "/save":
                if not no_learn:
                    save_memory(out, engine, memory, save_log)
                    changed = False
                    out.info(f"[dim]saved {memory}[/dim]")
                continue
            updates = engine.updates
            try:  # a bad line (too long, undecodable) is refused; the session and what it learned go on
                answer = engine.generate(line, learn=not no_learn, max_new_tokens=max_new_tokens, do_sample=False)
            except (ValueError, TypeError) as err:
                out.warn(f"line skipped: {err}")
                if out.json:
                    print(json.dumps({"prompt": line.encode("utf-8", "replace").decode("utf-8"), "error": str(err)},
                                     ensure_ascii=False), flush=True)
                continue
            turns += 1
            surprise = (engine.last_surprise or [float("nan")])[0]
            wrote = engine.updates != updates
            learned += wrote
            changed = changed or wrote
            if out.json:
                print(json.dumps({"prompt": line, "completion": answer, "surprise": _finite(surprise),
                                  "learned": wrote, "familiarity": _finite(engine.last_familiarity[0])},
                                 ensure_ascii=False), flush=True)
            else:
                print(("model> " if interactive else "") + answer.strip(), flush=True)
                if wrote:
                    out.info(f"[dim](surprise {surprise:.2f} nats: learned)[/dim]")
    except KeyboardInterrupt:
        out.info("")
    if changed and not no_learn:
        save_memory(out, engine, memory, save_log)
    out.info(f"[dim]{turns} turns, learned {learned}; {'saved ' + str(memory) if changed else 'nothing to save'}"
             f"[/dim]")


# ---------------------------------------------------------------------------------------------- inspect / push
@app.command()
@_command
def inspect(
    ctx: typer.Context,
    memory: MemoryOpt = ...,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show a memory folder: its config, base model, size and how much was taught (no model is loaded)."""
    out = _state(ctx, json_output, quiet)
    info = _read_memory_config(memory)
    if info is None:
        raise CliError(f"no memory at {str(memory)!r}")
    files = {p.name: p.stat().st_size for p in sorted(memory.iterdir()) if p.is_file()}
    weights, optimizer = _tensor_sizes(memory / info["files"]["weights"])
    log = info["files"]["taught_log"]
    data = {"command": "inspect", "memory": str(memory), "base_model": info["base_model"],
            "hf_titans_version": info["hf_titans_version"], "format_version": info["format_version"],
            "updates": info["engine"]["updates"], "taught_count": info["engine"]["taught_count"],
            "skipped_nonfinite": info["engine"]["skipped_nonfinite"], "taught_log": log,
            "memory_values": weights, "optimizer_values": optimizer, "bytes": sum(files.values()), "files": files,
            "config": info["memory_config"].to_dict()}
    out.result(data, _describe_text(data))


def _tensor_sizes(weights: Path) -> tuple[int, int]:
    """Numbers of memory values and of optimizer-state values in a safetensors file (read from its header)."""
    from safetensors import safe_open

    from .hub import OPTIMIZER_PREFIX

    memory_values = optimizer_values = 0
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            if name.startswith(OPTIMIZER_PREFIX):
                optimizer_values += n
            else:
                memory_values += n
    return memory_values, optimizer_values


def _describe_text(data: dict[str, Any]) -> str:
    base = data["base_model"]
    cfg = data["config"]
    log = f"{data['taught_log']} (opted in)" if data["taught_log"] else "not saved"
    lines = [
        f"memory          {data['memory']}",
        f"base model      {base['name_or_path'] or '(unnamed)'}"
        + (f" @ {base['revision']}" if base["revision"] else ""),
        f"                hidden size {base['hidden_size']}, vocabulary {base['vocab_size']}, "
        f"embeddings {base['embedding_fingerprint'][:23]}...",
        f"memory          {cfg['variant']}/{cfg['mode']}: {cfg['n_memory_tokens']} memory tokens, depth "
        f"{cfg['memory_depth']}, width {cfg['memory_hidden']}; {data['memory_values']:,} values "
        f"(+ {data['optimizer_values']:,} optimizer state)",
        f"taught          {data['taught_count']} texts, {data['updates']} updates"
        + (f", {data['skipped_nonfinite']} non-finite updates skipped" if data["skipped_nonfinite"] else ""),
        f"taught log      {log}",
        f"size            {data['bytes'] / 1e6:.2f} MB: " + ", ".join(f"{n} {s / 1e6:.2f} MB" for n, s in data["files"].items()),
        f"hf_titans       {data['hf_titans_version']} (format {data['format_version']})",
        "config",
    ]
    width = max(map(len, cfg))
    lines += [f"  {k:{width}s} {v}" for k, v in cfg.items()]
    return "\n".join(lines)


@app.command()
@_command
def push(
    ctx: typer.Context,
    memory: MemoryOpt = ...,
    repo: Annotated[str, typer.Option("--repo", help="The Hub repository, USER/NAME.", show_default=False)] = ...,
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    with_log: Annotated[bool, typer.Option(
        "--with-log", help="Also upload the taught texts (taught.jsonl); off by default, they may be private.")] = False,
    token: Annotated[Optional[str], typer.Option(
        "--token", help="A Hub token (default: HF_TOKEN or the `hf auth login` one).", show_default=False)] = None,
    model: ModelOpt = None,
    ignore_base_mismatch: MismatchOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upload a memory folder to the Hugging Face Hub (it is loaded onto its base model and checked first)."""
    out = _state(ctx, json_output, quiet)
    if not _looks_like_repo_id(repo):
        raise CliError(f"--repo must be a Hub repository id USER/NAME (letters, digits, '-', '_', '.'), got {repo!r}")
    info = _read_memory_config(memory)
    if info is None:
        raise CliError(f"no memory at {str(memory)!r}")
    if with_log and not info["files"]["taught_log"]:
        raise CliError(f"--with-log: {str(memory)!r} has no taught log (teach with --save-log to keep one)")
    engine, _ = open_engine(out, memory, model, ignore_base_mismatch=ignore_base_mismatch)
    from huggingface_hub.errors import HfHubHTTPError

    with _status(out, f"pushing to {repo}"):
        try:
            commit = engine.push_to_hub(repo, private=private or None, token=token, save_taught_log=with_log)
        except HfHubHTTPError as err:
            raise CliError(f"the Hub refused the push to {repo!r}: {err}", EXIT_FAILURE) from None
    url = str(getattr(commit, "repo_url", None) or getattr(commit, "commit_url", ""))
    out.result({"command": "push", "memory": str(memory), "repo": repo, "private": private, "url": url,
                "commit_url": getattr(commit, "commit_url", None)}, f"pushed {memory} to {url}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def serve(ctx: typer.Context) -> None:
    """Serve memories on vLLM behind an OpenAI-compatible front (`hf-titans serve --help`; needs the serve extra)."""
    from .serving.server import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args)))


def main() -> None:
    """The ``hf-titans`` console script."""
    app()


if __name__ == "__main__":
    main()
