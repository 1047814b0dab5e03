"""The `wsicodec` command: thin — parse options, call the API, print.

Every command runs inside :func:`_user_errors`, so a :class:`WsicodecError`, an OSError or damaged
compressed data becomes one ``error: ...`` line on stderr and a non-zero exit, never a traceback;
SIGTERM is handled like Ctrl-C (partials removed, ``error: interrupted``, exit 143; 130 for Ctrl-C).
Each command's work is done by the module named after its stage; the functions here only translate options.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import typing
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

from wsicodec._io import check_output_path
from wsicodec.errors import WsicodecError
from wsicodec.quant.quantizer import KINDS, kinds_help

# Help is plain text (click's formatter, not rich): it wraps at the terminal's width (at most 80 columns), shows
# `pip install "wsicodec[viewer]"` literally (rich markup would swallow "[viewer]") and works the same piped.
_METAVARS = {"model": "NAME|DIR", "device": "DEVICE", "quant": "KIND", "fmt": "tiff|dicom", "compression": "CODEC",
             "suffix": "SUFFIX", "host": "ADDRESS", "fm": "NAMES", "embedder": "NAME", "jpeg": "QUALITIES"}


def _metavar(param: TyperOption) -> str:
    """A plain metavar for an option's value: N, NUMBER, PATH, TEXT (typer would write <int range>)."""
    if param.name in _METAVARS:
        return _METAVARS[param.name]
    kind = param.type_descriptor.annotation
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
    return {int: "N", float: "NUMBER", Path: "PATH"}.get(kind, "TEXT")


class _Argument(TyperArgument):
    """An argument shown by its name alone: `INPUT...` (typer writes `INPUT <list[str]>` and `{INPUT}...`)."""

    @property
    def display_name_raw(self) -> str:
        return self.metavar or (self.name or "").upper()

    def display_type_rich(self, ctx) -> None:
        return None

    def get_usage_pieces(self, ctx) -> list[str]:
        return [] if self.hidden else [self._usage_display_name()]

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")


class _Command(TyperCommand):
    """Every command: plain metavars, and the whole first paragraph of its help in `wsicodec --help`'s list
    (click would cut it at 45 characters with "...")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.__class__ = _Argument
            elif isinstance(param, TyperOption) and not param.is_flag and param.metavar is None:
                param.metavar = _metavar(param)

    def get_short_help_str(self, limit: int = 45) -> str:
        if self.short_help:
            return self.short_help
        return " ".join((self.help or "").split("\n\n")[0].split())


app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Archive whole-slide images as quantised autoencoder latents (.pzarr) and restore them.",
)


def _version(value: bool) -> None:
    if value:
        from wsicodec._version import __version__

        typer.echo(f"wsicodec {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Print the version and exit."),
) -> None:
    """Archive whole-slide images as quantised autoencoder latents (.pzarr) and restore them."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every atomic output on the way out removes its partial."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _os_error_line(exc: OSError) -> str:
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return ": ".join([*names, _one_line(exc.strerror or exc) or type(exc).__name__])


@contextmanager
def _user_errors():
    # signal handlers can only be set from the main thread (CliRunner in a worker thread is not)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except WsicodecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        typer.secho("error: interrupted", fg=typer.colors.RED, err=True)
        raise typer.Exit(143 if isinstance(exc, _Terminated) else 130)
    except OSError as exc:  # disk full, permissions, a vanished file: the environment, not a bug
        typer.secho(f"error: {_os_error_line(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    except (zipfile.BadZipFile, zlib.error) as exc:
        typer.secho(f"error: damaged compressed data: {_one_line(exc) or type(exc).__name__}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _batch_mode(paths: list[str], kind: str) -> bool:
    """Whether the arguments ask for a batch; names too long for any filesystem are refused first."""
    from wsicodec._io import check_name_length
    from wsicodec.pipeline import batch

    for p in paths:
        check_name_length(p)
    return batch.is_batch(paths, kind)


# ---------------------------------------------------------------- compress / info
@app.command(cls=_Command)
def compress(
    paths: list[str] = typer.Argument(..., metavar="INPUT", help="A slide and its container (slide.svs slide.pzarr); or a batch: slides, folders (searched recursively; a folder of .dcm files is one DICOM slide) and .csv/.txt manifests, then the output folder (docs/batch.md)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registry name or local model folder; default: the builtin model. See `wsicodec models`."),
    quant: Optional[str] = typer.Option(None, "--quant", help=f"{kinds_help()}; default: the model's recommended quantiser, else kmeans."),
    levels: Optional[int] = typer.Option(None, "--levels", min=2, max=256, help="Quantiser levels (<= 256; fewer levels, fewer bytes)."),
    quality: Optional[str] = typer.Option(None, "--quality", help="Operating point of a rate-distortion-trained model: low, default or high for the builtin model (about 1.5, 2.5 and 5 KB per tissue tile)."),
    mpp: float = typer.Option(0.5, "--mpp", help="Archive resolution in µm/px (0.5 = 20x)."),
    source_mpp: Optional[float] = typer.Option(None, "--source-mpp", help="The source's µm/px, for slides that don't record it (overrides the slide's own)."),
    all_tiles: bool = typer.Option(False, "--all-tiles", help="Encode background tiles too."),
    tissue_threshold: float = typer.Option(0.001, "--tissue-threshold", min=0.0, max=0.999, help="A tile is glass (not stored) when at most this fraction of its pixels is tissue-like at the archived resolution; docs/compress.md has its measured cost in bytes."),
    encode_margin: Optional[int] = typer.Option(None, "--encode-margin", min=0, help="Pixels of neighbouring context each tile is encoded with (rounded up to whole latent cells); default 32."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: CUDA, then MPS, then CPU."),
    workers: int = typer.Option(2, "--workers", "--read-workers", min=1, help="Threads reading the slide."),
    single_file: bool = typer.Option(False, "--single-file", help="Write one zip file instead of a directory (see formats/pzarr-v1.md)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (only once the new one is complete)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    allow_empty: bool = typer.Option(False, "--allow-empty", help="Archive a slide in which no tissue is found (otherwise refused)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Batch: worker processes, each loading the model once; default one per GPU with CUDA, else 1."),
    retries: int = typer.Option(0, "--retries", min=0, help="Batch: retry a slide's failures this many times (input errors are never retried)."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="Batch: run each slide as a Ray task: 'local' (a private cluster on this machine), 'auto', or ray://HOST:10001. Needs pip install \"wsicodec[ray]\"."),
    force_name: bool = typer.Option(False, "--force-name", help="Write the container under a name that does not end in .pzarr (or .pzarr.zip with --single-file)."),
) -> None:
    """Compress a slide into a .pzarr container, or a batch of slides into a folder (resumable)."""
    import json

    from wsicodec.pipeline import batch
    from wsicodec.pipeline.compress import compress as run

    with _user_errors():
        batch_mode = _batch_mode(paths, "compress")
    if batch_mode:
        with _user_errors():
            options = batch.CompressOptions(
                model=model, quant=quant, levels=levels, quality=quality, target_mpp=mpp, source_mpp=source_mpp,
                all_tiles=all_tiles, tissue_threshold=tissue_threshold, encode_margin=encode_margin, batch_size=batch_size, device=device,
                read_workers=workers, single_file=single_file, allow_empty=allow_empty, overwrite=overwrite)
            result = batch.compress_batch(paths[:-1], paths[-1], options, jobs=jobs, retries=retries, ray=ray,
                                          progress=not quiet and not json_out)
        if json_out:
            typer.echo(json.dumps(result.to_json(), indent=2, default=str))
        else:
            batch.print_summary(result)
        raise typer.Exit(result.exit_code)
    if len(paths) != 2:
        typer.secho("error: give a slide and an output container (or slides/folders/manifests and an output "
                    "folder)", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    slide, out = (Path(p) for p in paths)
    with _user_errors():
        if ray is not None:
            raise WsicodecError("--ray runs batches: give an output folder (OUT/) as the last argument")
        check_output_path(out)  # before any encoding
        _check_container_name(out, single_file, force_name)
        summary = run(slide, out, model=model, quant=quant, levels=levels, quality=quality, target_mpp=mpp,
                      source_mpp=source_mpp,
                      all_tiles=all_tiles, batch_size=batch_size, device=device, read_workers=workers,
                      tissue_threshold=tissue_threshold, encode_margin=encode_margin, overwrite=overwrite, single_file=single_file,
                      allow_empty=allow_empty, progress=not quiet and not json_out)
    if json_out:
        typer.echo(json.dumps(summary.to_json(), indent=2))
    else:
        typer.echo(summary.line())


def _check_container_name(out: Path, single_file: bool, force_name: bool) -> None:
    """`compress s.svs x.tiff` would write a container named like a TIFF: refuse unless --force-name."""
    name = out.name.lower().rstrip("/")
    allowed = (".pzarr", ".pzarr.zip") if single_file else (".pzarr",)
    if force_name or name.endswith(allowed):
        return
    raise WsicodecError(f"{out.name}: a container's name ends in {' or '.join(allowed)} (e.g. "
                        f"{out.name.split('.')[0] or 'slide'}{allowed[0]}); pass --force-name to use this one")


@app.command(cls=_Command)
def verify(
    paths: list[Path] = typer.Argument(..., help="Containers, or folders to search for them."),
    decode: bool = typer.Option(False, "--decode", help="Also decode every tile with the container's model."),
    source: Optional[Path] = typer.Option(None, "--source", help="Re-hash this source slide against the recorded SHA-256 (one container)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Decode with this model folder instead of the recorded one (same decoder hash)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device for --decode."),
    json_out: bool = typer.Option(False, "--json", help="One JSON report per container."),
) -> None:
    """Check containers: structure, completeness and every checksum. Exit 0 only if all are intact (and
    with --source, that slide is the one the container was made from)."""
    import json

    from wsicodec.pipeline.verify import verify_container
    from wsicodec.stats.report import find_containers

    with _user_errors():
        found, skipped = find_containers(paths)
        if source is not None and len(found) != 1:
            raise WsicodecError("--source checks one container against one slide; name exactly one container")
        reports = [verify_container(p, decode=decode, source=source, model=model, device=device) for p in found]
    bad = [r for r in reports if not r.ok]
    if json_out:
        typer.echo(json.dumps([r.to_json() for r in reports] + [{"path": s.path, "ok": False, "problems": [
            {"where": "path", "what": s.reason}]} for s in skipped], indent=2))
    else:
        for r in reports:
            if r.intact:  # the container is sound; a --source that differs is reported on its own line
                how = "every byte checked" if r.checksummed else "structure only: format 1.0 has no checksums"
                extra = f", {r.tiles_decoded} tiles decoded" if decode else ""
                typer.echo(f"{'ok' if r.ok else 'intact'}: {r.path} ({how}{extra})")
            for p in r.problems:
                typer.echo(f"damaged: {r.path}: {p.line()}")
            for p in r.source_problems:
                typer.echo(f"{p.where}: {r.path}: {p.what}")
        for s in skipped:
            typer.echo(f"error: {s.path}: {s.reason}")
    if bad or skipped or not reports:
        raise typer.Exit(1)


@app.command(cls=_Command)
def info(
    container: Path = typer.Argument(..., help="A .pzarr container."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Describe a .pzarr container: source, resolution, grid, model, quantiser, sizes."""
    import json

    from wsicodec.format.container import Container

    with _user_errors():
        with Container.open(container) as c:
            description = c.describe()
            problems = c.verify()
    description["integrity"] = {
        "status": "damaged" if problems else ("intact" if description["format_version"] >= "1.1"
                                              else "unchecked (format 1.0 has no checksums)"),
        "problems": [p.line() for p in problems],
    }
    if json_out:
        typer.echo(json.dumps(description, indent=2))
    else:
        _print_tree(description)
    if problems:
        raise typer.Exit(1)


def _info_value(key: str, value):
    """One value of `info`'s tree as a person reads it: sizes in KB/MB, resolutions in µm/px, ratios as ×,
    other floats to 4 significant digits (--json keeps the exact numbers)."""
    from wsicodec.stats.report import human_bytes

    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        if key.endswith("bytes") or key in ("size", "bytes_per_tissue_tile"):
            return f"{human_bytes(value)} ({int(value):,} bytes)" if value >= 1000 else f"{int(value)} bytes"
        if key.endswith("mpp"):
            return f"{value:.4g} µm/px"
        if key == "ratio":
            return f"{value:.1f}×"
        if key.endswith("objective_power"):
            return f"{value:g}×"
        if key.endswith("_px"):
            return f"{value:g} px"
        if isinstance(value, float):
            return f"{value:.4g}"
        return value
    if isinstance(value, list) and any(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return value


def _print_tree(description: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.tree import Tree

    def add(node: Tree, value) -> None:
        for key, item in value.items():
            if isinstance(item, dict):
                if item:
                    add(node.add(f"[bold]{escape(str(key))}[/bold]"), item)
            elif isinstance(item, list) and len(item) > 8:
                node.add(f"{escape(str(key))}: {len(item)} values")
            else:
                node.add(escape(f"{key}: {_info_value(str(key), item)}"))

    tree = Tree("[bold].pzarr container[/bold]")
    add(tree, {k: v for k, v in description.items() if k != "properties"})
    Console().print(tree)


@app.command("models", cls=_Command)
def models_(json_out: bool = typer.Option(False, "--json")) -> None:
    """List the autoencoders wsicodec knows and whether their weights are available offline."""
    import json

    from wsicodec.models.registry import models_table

    with _user_errors():
        rows = models_table()
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), caption="f: pixels per latent cell; c: latent channels")
    wide = console.width >= 140
    if wide:
        for name in ("id", "f", "c", "offline", "class", "source"):
            table.add_column(name, overflow="fold", justify="right" if name in ("f", "c") else "left")
        table.add_column("description", overflow="fold", ratio=1)
    else:
        # 80 columns: each model takes a few lines (description under its id, source under its class) so that
        # ids and numbers stay whole and nothing is cut
        table.add_column("model", overflow="fold", ratio=3, min_width=21)
        table.add_column("f", justify="right", no_wrap=True)
        table.add_column("c", justify="right", no_wrap=True)
        table.add_column("offline", no_wrap=True)
        table.add_column("class / source", overflow="fold", ratio=2)
    for row in rows:
        cells = [str(row["id"]), str(row["f"]), str(row["c"]), "yes" if row["offline"] else "no", str(row["class"]),
                 str(row["source"]), str(row["description"])]
        if wide:
            table.add_row(*map(Text, cells))
        else:
            model = Text(cells[0], style="bold")
            model.append("\n" + cells[6], style="dim")
            table.add_row(model, Text(cells[1]), Text(cells[2]), Text(cells[3]), Text(f"{cells[4]}\n{cells[5]}"))
            table.add_section()
    console.print(table)


# ---------------------------------------------------------------- restore
@app.command(cls=_Command)
def restore(
    paths: list[str] = typer.Argument(..., metavar="CONTAINER", help="A .pzarr container and the output: a pyramidal .tiff/.tif/.svs; a .png/.jpg holds the whole slide when it is small (at most 40 Mpx), or one region with --region; with --format dicom, a folder. Or a batch: containers or folders of them, then the output folder (docs/batch.md)."),
    region: Optional[tuple[int, int, int, int]] = typer.Option(
        None, "--region", metavar="X Y W H",
        help="Restore only this region: X Y in level-0 pixels of the archived resolution, W H in pixels of --level."),
    level: int = typer.Option(0, "--level", min=0, help="With --region: pyramid level N, a 2**N downsample."),
    quality: int = typer.Option(90, "--quality", min=1, max=100, help="JPEG quality of the TIFF tiles."),
    compression: str = typer.Option("jpeg", "--compression", help="TIFF tiles: jpeg | deflate | lzw | zstd (the last three lossless)."),
    fmt: str = typer.Option("tiff", "--format", help="tiff: a pyramidal BigTIFF; dicom: OUT is a folder of DICOM WSI files, one per level plus label/overview, JPEG tiles (docs/dicom.md)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Decoder to use instead of the one the container records (registry name or folder)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: CUDA, then MPS, then CPU."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Tiles decoded per batch."),
    force: bool = typer.Option(False, "--force", help="Decode even if the decoder weights differ from the container's record."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (only once the new one is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Batch: worker processes, each loading the model once; default one per GPU with CUDA, else 1."),
    retries: int = typer.Option(0, "--retries", min=0, help="Batch: retry a container's failures this many times (input errors are never retried)."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="Batch: run each container as a Ray task: 'local', 'auto' or ray://HOST:10001."),
    suffix: str = typer.Option(".tiff", "--suffix", help="Batch: the outputs' suffix, OUT/<name><suffix> (.tiff or .svs)."),
    patient_id: Optional[str] = typer.Option(None, "--patient-id", metavar="ID", help="DICOM: the PatientID to file the slide under."),
    accession: Optional[str] = typer.Option(None, "--accession", metavar="NUMBER", help="DICOM: the AccessionNumber of the order."),
    study_uid: Optional[str] = typer.Option(None, "--study-uid", metavar="UID", help="DICOM: put the slide into this existing study (default: a UID derived from the container)."),
    dicom_attrs_file: Optional[Path] = typer.Option(None, "--dicom-attrs", metavar="JSON", help="DICOM: a JSON file of patient/study attributes by keyword, e.g. {\"PatientName\": \"Doe^Jane\", \"PatientBirthDate\": \"19700101\"} (docs/dicom.md); the options above win."),
) -> None:
    """Restore a viewable pyramidal TIFF (or a region) from a .pzarr container, or a batch into a folder."""
    # the package's own `restore` function shadows the module name: import the functions
    from wsicodec.pipeline import batch
    from wsicodec.pipeline.restore import restore as _restore_tiff
    from wsicodec.pipeline.restore import restore_region as _restore_region

    # `restore X.pzarr OUT --format dicom`: OUT is the DICOM folder (existing or not, trailing / or not), not a batch
    with _user_errors():
        batch_mode = not (fmt == "dicom" and len(paths) == 2) and _batch_mode(paths, "restore")
    if batch_mode:
        with _user_errors():
            if region is not None:
                raise WsicodecError("--region restores one region of one container; not in a batch")
            if fmt != "tiff":
                raise WsicodecError("--format dicom restores one container; not in a batch (yet)")
            if suffix.lower() not in (".tiff", ".tif", ".svs"):
                raise WsicodecError(f"--suffix must be .tiff, .tif or .svs, got {suffix!r}")
            options = batch.RestoreOptions(compression=compression, quality=quality, model=model, device=device,
                                           batch_size=batch_size, force=force, overwrite=overwrite, suffix=suffix)
            result = batch.restore_batch(paths[:-1], paths[-1], options, jobs=jobs, retries=retries, ray=ray,
                                         progress=not quiet)
        batch.print_summary(result)
        raise typer.Exit(result.exit_code)
    if len(paths) != 2:
        typer.secho("error: give a container and an output (or containers/folders and an output folder)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    container, out = (Path(p) for p in paths)
    with _user_errors():
        if ray is not None:
            raise WsicodecError("--ray runs batches: give an output folder (OUT/) as the last argument")
        if fmt not in ("tiff", "dicom"):
            raise WsicodecError(f"--format must be tiff or dicom, got {fmt!r}")
        if fmt == "dicom" and region is not None:
            raise WsicodecError("--format dicom restores the whole slide; --region writes one image, not DICOM")
        if fmt == "dicom" and compression != "jpeg":
            raise WsicodecError("--format dicom writes JPEG baseline tiles; --compression applies to TIFF only")
        dicom_attrs = _dicom_attrs(dicom_attrs_file, patient_id, accession, study_uid)
        if dicom_attrs and fmt != "dicom":
            raise WsicodecError("--patient-id, --accession, --study-uid and --dicom-attrs go into DICOM: "
                                "add --format dicom")
        if region is not None:
            x, y, w, h = region
            img = _restore_region(container, out, x, y, w, h, level=level, device=device, batch_size=batch_size,
                                  model=model, force=force, overwrite=overwrite)
            clipped = " (the region clipped to the image)" if img.shape[:2] != (h, w) else ""
            typer.echo(f"wrote {out} ({img.shape[1]}x{img.shape[0]} px at level {level}){clipped}")
            return
        summary = _restore_tiff(container, out, compression=compression, quality=quality, device=device,
                                batch_size=batch_size, model=model, force=force, overwrite=overwrite,
                                progress=not quiet, format=fmt, dicom_attrs=dicom_attrs or None)
    typer.echo(summary.line())


def _dicom_attrs(path: Optional[Path], patient_id, accession, study_uid) -> dict:
    """--dicom-attrs FILE, then --patient-id / --accession / --study-uid over it (validated when written)."""
    import json

    attrs: dict = {}
    if path is not None:
        try:
            attrs = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise WsicodecError(f"--dicom-attrs {path}: not JSON ({exc})") from None
        if not isinstance(attrs, dict):
            raise WsicodecError(f"--dicom-attrs {path}: must hold a JSON object of DICOM keywords and values")
    for key, value in (("PatientID", patient_id), ("AccessionNumber", accession), ("StudyInstanceUID", study_uid)):
        if value is not None:
            attrs[key] = value
    return attrs


# ---------------------------------------------------------------- stats
@app.command(cls=_Command)
def stats(
    paths: list[Path] = typer.Argument(..., help="Containers (or slides with --estimate), or folders to search."),
    estimate: bool = typer.Option(False, "--estimate", help="Project the containers of slides not yet compressed, from a sample of tiles."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="With --estimate: registry name or local model folder; default: the builtin model."),
    quant: Optional[str] = typer.Option(None, "--quant", help=f"With --estimate: {' | '.join(KINDS)}; default as compress."),
    levels: Optional[int] = typer.Option(None, "--levels", min=2, max=256, help="With --estimate: quantiser levels."),
    sample: int = typer.Option(32, "--sample", min=2, help="With --estimate: tissue tiles encoded per slide."),
    mpp: float = typer.Option(0.5, "--mpp", help="With --estimate: archive resolution in µm/px (0.5 = 20x)."),
    source_mpp: Optional[float] = typer.Option(None, "--source-mpp", help="With --estimate: µm/px of the slides that record no resolution (the others keep their own)."),
    all_tiles: bool = typer.Option(False, "--all-tiles", help="With --estimate: as compress --all-tiles."),
    single_file: bool = typer.Option(False, "--single-file", help="With --estimate: as compress --single-file."),
    seed: int = typer.Option(0, "--seed", help="With --estimate: seed of the tile sample (0 with --sample 64: the very tiles compress fits its codebook on)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: CUDA, then MPS, then CPU."),
    price: Optional[float] = typer.Option(None, "--price-per-tb-month", min=0, help="Storage price in USD per TB (10^12 bytes) per month. Default 23, the list price of AWS S3 Standard (us-east-1, first 50 TB, $0.023/GB-month); use your own."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON (schema: docs/stats-schema.json)."),
    csv_out: bool = typer.Option(False, "--csv", help="Print the report as CSV, one line per slide and a TOTAL line."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw per-slide size now vs after into this PNG."),
    verify_all: bool = typer.Option(False, "--verify", help="Check every byte of each container (reads them whole); without it, what opening checks: metadata, small arrays, every key present."),
) -> None:
    """Report what compressing saved (containers) or will save (--estimate), with yearly storage cost.

    Unreadable inputs are listed as skipped with their reason; the exit status is then 3.
    """
    import json

    from wsicodec.stats import report as st

    if json_out and csv_out:
        typer.secho("error: choose one of --json and --csv", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    price = st.DEFAULT_PRICE_PER_TB_MONTH if price is None else price
    quiet = json_out or csv_out
    with _user_errors():
        if estimate:
            report = st.estimate(paths, model=model, quant=quant, levels=levels, sample=sample, target_mpp=mpp,
                                 source_mpp=source_mpp, all_tiles=all_tiles, seed=seed, batch_size=batch_size,
                                 device=device, single_file=single_file, price_per_tb_month=price,
                                 progress=not quiet)
        else:
            report = st.container_stats(paths, price_per_tb_month=price, progress=not quiet, verify=verify_all)
        if plot is not None and report.rows:
            st.plot(report, plot)
    if json_out:
        typer.echo(json.dumps(report.to_json(), indent=2))
    elif csv_out:
        typer.echo(report.to_csv(), nl=False)
    else:
        st.print_table(report)
    if plot is not None and not report.rows:
        typer.secho("error: nothing to plot, no input could be read", fg=typer.colors.RED, err=True)
    for skip in report.skipped if quiet else ():
        typer.secho(f"skipped {skip.path}: {skip.reason}", fg=typer.colors.YELLOW, err=True)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


# ---------------------------------------------------------------- eval / finetune
@app.command("eval", cls=_Command)
def eval_(
    inputs: list[Path] = typer.Argument(..., help="Slides (tissue tiles at --mpp) and/or images or folders of image tiles."),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="Registry name or local model folder; repeat for several. Default: the builtin model; 'none' for JPEG only."),
    quant: str = typer.Option("default,none,int8,kmeans", "--quant", help=f"Quantisers per model, comma-separated: default (what compress uses), {', '.join(KINDS)}; levels as kmeans:128, uniform:64."),
    jpeg: str = typer.Option("75,50,20,10", "--jpeg", help="JPEG qualities (Pillow), comma-separated; '' for none."),
    baseline: str = typer.Option("avif,jpegxl,webp", "--baseline", help="Image codecs compared at equal bytes (each model row's stored size): avif, jpegxl, webp, comma-separated; '' for none."),
    embedder: Optional[list[str]] = typer.Option(None, "--embedder", "-e", help="uni, phikon-v2, gigapath (gated hub models), lpips-vgg, lpips-alex (offline stand-ins); repeat. Default: uni and lpips-vgg."),
    images_mpp: Optional[float] = typer.Option(None, "--images-mpp", help="µm/px of the image inputs (MoNuSeg: 0.25), resampled to --mpp; default: taken as they are."),
    mpp: float = typer.Option(0.5, "--mpp", help="Archive resolution in µm/px (0.5 = 20x)."),
    source_mpp: Optional[float] = typer.Option(None, "--source-mpp", help="µm/px of slides that don't record it."),
    max_tiles: Optional[int] = typer.Option(256, "--max-tiles", min=1, help="Evaluate at most this many tiles (a seeded random sample)."),
    seed: int = typer.Option(0, "--seed"),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write the table as CSV."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the table and settings as JSON."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the table as Markdown."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Rate-distortion figure (PNG): KB/tile against each metric, one curve per codec."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: CUDA, then MPS, then CPU."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the table."),
) -> None:
    """Measure fidelity against JPEG, the paper's way (Table 1 + a rate-distortion plot)."""
    from rich.console import Console
    from rich.markup import escape

    from wsicodec.research import evaluate as ev

    err = Console(stderr=True)
    note = (lambda m: None) if quiet else (lambda m: err.print(f"[dim]{escape(m)}[/dim]"))
    warn = lambda m: err.print(f"[yellow]warning:[/yellow] {escape(m)}")  # noqa: E731
    with _user_errors():
        for p in (csv_out, json_out, markdown, plot):
            if p is not None and not p.parent.exists():
                raise WsicodecError(f"output folder does not exist: {p.parent}")
        if plot is not None and plot.suffix.lower() != ".png":
            raise WsicodecError(f"--plot writes a PNG: give a .png path, not {plot.name}")
        quants = ev.parse_quants(quant)
        qualities = ev.parse_jpeg_qualities(jpeg)
        models = list(model) if model else [None]
        models = [m for m in models if m is None or m.lower() != "none"]
        if not models and not qualities:
            raise WsicodecError("nothing to evaluate: no model and no JPEG quality")
        note("reading tiles")
        tiles = ev.load_eval_tiles(inputs, target_mpp=mpp, images_mpp=images_mpp, slide_mpp=source_mpp,
                                   max_tiles=max_tiles, seed=seed)
        report = ev.evaluate(tiles, models=models, quants=quants, jpeg=qualities,
                             baselines=ev.parse_baselines(baseline),
                             embedders=list(embedder) if embedder else list(ev.DEFAULT_EMBEDDERS),
                             device=device, batch_size=batch_size, warn=warn, progress=note)
        # piped output (logs, CI) gets a wide table rather than rich's 80-column default
        Console(width=None if sys.stdout.isatty() else 160).print(report.rich_table())
        ev.write_report(report, csv_path=csv_out, json_path=json_out, markdown_path=markdown, plot_path=plot)
        for p in (csv_out, json_out, markdown, plot):
            if p is not None:
                note(f"wrote {p}")


@app.command(cls=_Command)
def finetune(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model whose decoder to tune (registry name or folder); default: the builtin model."),
    data: list[Path] = typer.Option(..., "--data", help="Training slides, images or folders (repeat). Use data you may train on."),
    out: Path = typer.Option(..., "--out", help="Output model folder (loadable with --model OUT)."),
    steps: int = typer.Option(500, "--steps", min=1),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    lr: float = typer.Option(5e-5, "--lr"),
    warmup: int = typer.Option(50, "--warmup", min=0, help="Linear learning-rate warm-up steps."),
    w_l1: float = typer.Option(1.0, "--w-l1", min=0),
    w_gan: float = typer.Option(0.5, "--gan-weight", "--w-gan", min=0, help="Weight of the PatchGAN term."),
    w_fm: float = typer.Option(1.0, "--fm-weight", "--w-fm", min=0, help="Weight of the foundation-model embedding term."),
    fm: str = typer.Option("uni,lpips-vgg", "--fm", help="Feature-matching embedders, first available wins: uni, phikon-v2, gigapath, lpips-vgg, lpips-alex."),
    gan_start: int = typer.Option(200, "--gan-start", min=0, help="Discriminator warm-up: step at which the PatchGAN term reaches the decoder (the discriminator trains from step 0)."),
    quant: str = typer.Option("kmeans", "--quant", help=f"Quantiser the decoder is tuned for: {', '.join(KINDS)} (levels as uniform:N)."),
    latent_noise: float = typer.Option(0.0, "--latent-noise", min=0, help="Extra uniform latent noise, in quantiser level spacings."),
    crop: int = typer.Option(0, "--crop", min=0, help="Train on random crops of this many output pixels; 0 (default) = whole tiles, as they are decoded."),
    images_mpp: Optional[float] = typer.Option(None, "--images-mpp", help="µm/px of image inputs, resampled to --mpp."),
    mpp: float = typer.Option(0.5, "--mpp", help="Archive resolution in µm/px."),
    source_mpp: Optional[float] = typer.Option(None, "--source-mpp", help="µm/px of slides that don't record it."),
    max_tiles: int = typer.Option(512, "--max-tiles", min=1),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=1),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.pt (or extend a finished run to --steps)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: CUDA, then MPS, then CPU."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fine-tune a model's decoder for pathology (encoder frozen; L1 + PatchGAN + feature matching)."""
    from rich.console import Console
    from rich.markup import escape

    from wsicodec.research.finetune import FinetuneConfig, finetune as run

    err = Console(stderr=True)
    with _user_errors():
        cfg = FinetuneConfig(
            model=model, data=[str(d) for d in data], out=str(out), steps=steps, batch_size=batch_size, lr=lr,
            warmup=warmup, w_l1=w_l1, w_gan=w_gan, w_fm=w_fm, fm=[s.strip() for s in fm.split(",") if s.strip()],
            gan_start=gan_start, quant=quant, latent_noise=latent_noise, crop=crop, target_mpp=mpp,
            images_mpp=images_mpp, slide_mpp=source_mpp, max_tiles=max_tiles, seed=seed,
            checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite, device=device)
        summary = run(cfg, say=(lambda m: None) if quiet else (lambda m: err.print(f"[dim]{escape(m)}[/dim]")),
                      show_progress=not quiet)
    typer.echo(f"wrote {summary['folder']}: model id {summary['id']} ({summary['steps']} steps on "
               f"{summary['tiles']} tiles, {summary['seconds']:.0f} s; use --model {summary['folder']})")


# ---------------------------------------------------------------- train
@app.command(cls=_Command)
def train(
    data: list[str] = typer.Option(..., "--data", help="Slides, image files/folders, or .npy tile caches (repeat --data, or list several after it)."),
    out: Path = typer.Option(..., "--out", help="Model folder to write (checkpoints live in it; --model DIR loads it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt."),
    steps: int = typer.Option(20000, "--steps", help="Total optimiser steps (a resumed run may raise it)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    crop: int = typer.Option(128, "--crop", help="Training crop in pixels, taken from the tiles."),
    lr: float = typer.Option(1e-3, "--lr"),
    warmup: int = typer.Option(200, "--warmup", help="Linear learning-rate warm-up steps."),
    latent_channels: int = typer.Option(4, "--latent-channels"),
    factor: int = typer.Option(8, "--factor", help="Spatial factor: pixels per latent cell (power of two >= 4)."),
    levels_noise: int = typer.Option(64, "--levels-noise", help="Train with uniform noise of this many quantiser levels (0: none)."),
    lpips_weight: float = typer.Option(0.5, "--lpips-weight", help="Weight of LPIPS-Alex in the loss (0: off)."),
    mse_weight: float = typer.Option(1.0, "--mse-weight"),
    gan_after: int = typer.Option(0, "--gan-start", "--gan-after", help="Add a PatchGAN loss from this step on (0: never)."),
    gan_weight: float = typer.Option(0.1, "--gan-weight"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, mps (default: the best available)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    images_mpp: Optional[float] = typer.Option(None, "--images-mpp", help="µm/px of image inputs; they are resampled to --mpp."),
    slide_mpp: Optional[float] = typer.Option(None, "--source-mpp", "--slide-mpp", help="µm/px of slides that don't record it."),
    mpp: float = typer.Option(0.5, "--mpp", help="Archive resolution to train at (µm/px)."),
    max_tiles: Optional[int] = typer.Option(None, "--max-tiles", help="Random subset of at most this many tiles per slide and overall."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Stop (with a checkpoint) after this many minutes; the LR schedule fits it."),
    ckpt_every: int = typer.Option(500, "--checkpoint-every", "--ckpt-every", min=1, help="Steps between checkpoints."),
    eval_every: int = typer.Option(250, "--eval-every"),
    holdout: int = typer.Option(16, "--holdout", help="Tiles held out for the progress bar's PSNR."),
    seed: int = typer.Option(0, "--seed"),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="Id recorded in containers (default local:<folder name>)."),
    arch: Optional[str] = typer.Option(None, "--arch", metavar="JSON", help='Layer widths and block counts over the builtin defaults, e.g. \'{"dec_widths": [160, 64], "dec_blocks": [2, 2]}\' (docs/training.md).'),
    rate: Optional[str] = typer.Option(None, "--rate", metavar="NAME:BPP,...", help="Rate-distortion training: operating points and their target bits per pixel (the model's own entropy), e.g. default:0.27 or low:0.16,default:0.27,high:0.55. Replaces --levels-noise; docs/training.md."),
    extra_data: Optional[list[str]] = typer.Argument(None, hidden=True),
) -> None:
    """Train an autoencoder (the builtin model's recipe) on your own slides or tiles."""
    with _user_errors():
        from wsicodec.research.train import TrainConfig, parse_rate_points, train as run_training

        rd_names, rd_bpp = parse_rate_points(rate) if rate else (None, None)
        arch_overrides = _json_object(arch, "--arch") if arch else {}
        cfg = TrainConfig(arch=arch_overrides,
            data=list(data) + list(extra_data or []), out=out, steps=steps, batch_size=batch_size, crop=crop,
            lr=lr, warmup=warmup, latent_channels=latent_channels, factor=factor, levels_noise=levels_noise,
            lpips_weight=lpips_weight, mse_weight=mse_weight, gan_after=gan_after, gan_weight=gan_weight,
            device=device, threads=threads, images_mpp=images_mpp, slide_mpp=slide_mpp, target_mpp=mpp,
            max_tiles=max_tiles, time_limit_min=time_limit, ckpt_every=ckpt_every, eval_every=eval_every, holdout=holdout,
            seed=seed, model_id=model_id, resume=resume, rd_qualities=rd_names, rd_target_bpp=rd_bpp,
        )
        folder = run_training(cfg)
        typer.echo(f"model folder: {folder}  (use --model {folder})")


def _json_object(text: str, option: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise WsicodecError(f"{option} takes a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise WsicodecError(f"{option} takes a JSON object, not {type(value).__name__}")
    return value


# ---------------------------------------------------------------- serve
@app.command(cls=_Command)
def serve(
    paths: list[Path] = typer.Argument(..., metavar="PATH", help="Containers, or folders searched recursively for them; each is served under its file name without .pzarr."),
    source: Optional[Path] = typer.Option(None, "--source", help="The original slide of a single container: adds a synchronised side-by-side view and an error heat-map."),
    source_dir: Optional[Path] = typer.Option(None, "--source-dir", help="Folder holding the originals, matched by the file name each container records."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default serves this machine only."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Decode with this model instead of the one each container records."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: CUDA, then MPS, then CPU."),
    workers: int = typer.Option(4, "--workers", min=1, help="Threads decoding and encoding tiles."),
    cache_tiles: int = typer.Option(1024, "--cache-tiles", min=0, help="Encoded tiles kept in memory (LRU)."),
) -> None:
    """Serve containers in a web viewer (OpenSeadragon, DeepZoom URLs). Needs pip install "wsicodec[viewer]"."""
    with _user_errors():
        try:
            import uvicorn

            from wsicodec.viewer.server import build_app, load_slides
        except ImportError as exc:
            raise WsicodecError(f"serve needs the viewer extra ({exc.name} is missing): "
                                f'pip install "wsicodec[viewer]"') from None
        entries = load_slides(paths, source=source, source_dir=source_dir, model=model, device=device)
        app_ = build_app(entries, workers=workers, cache_tiles=cache_tiles)
        if host not in ("127.0.0.1", "localhost", "::1"):
            typer.secho(f"warning: serving on {host}: anyone who can reach it can read these slides",
                        fg=typer.colors.YELLOW, err=True)
        # bind here, so that --port 0 (any free port) can say which port it got
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise WsicodecError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
        real_port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"serving {len(entries)} slide(s) on http://{shown}:{real_port}/ (Ctrl-C stops)")
        server = uvicorn.Server(uvicorn.Config(app_, host=host, port=real_port, log_level="warning"))
        server.run(sockets=[sock])


if __name__ == "__main__":  # pragma: no cover
    app()
