"""The `wsicodec` command: thin — parse options, call the API, print.

Every command runs inside :func:`_user_errors`, so a :class:`WsicodecError` becomes one
``error: ...`` line on stderr and a non-zero exit, never a traceback.
Each command's work is done by the module named after its stage; the functions here only translate options.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from wsicodec.errors import WsicodecError
from wsicodec.quant.quantizer import KINDS, kinds_help

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Archive whole-slide images as quantised autoencoder latents (.pzarr) and restore them.",
)


@contextmanager
def _user_errors():
    try:
        yield
    except WsicodecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("error: interrupted", fg=typer.colors.RED, err=True)
        raise typer.Exit(130)


# ---------------------------------------------------------------- compress / info
@app.command()
def compress(
    slide: Path = typer.Argument(..., help="Source slide: anything OpenSlide opens (.svs, .ndpi, .mrxs, DICOM, TIFF...)."),
    out: Path = typer.Argument(..., help="Output container, e.g. slide.pzarr"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registry name or local model folder; default: the builtin model. See `wsicodec models`."),
    quant: Optional[str] = typer.Option(None, "--quant", help=f"{kinds_help()}; default: the model's recommended quantiser, else kmeans."),
    levels: Optional[int] = typer.Option(None, "--levels", min=2, max=256, help="Quantiser levels (<= 256; fewer levels, fewer bytes)."),
    mpp: float = typer.Option(0.5, "--mpp", help="Archive resolution in µm/px (0.5 = 20x)."),
    source_mpp: Optional[float] = typer.Option(None, "--source-mpp", help="The source's µm/px, for slides that don't record it (overrides the slide's own)."),
    all_tiles: bool = typer.Option(False, "--all-tiles", help="Encode background tiles too."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: CUDA, then MPS, then CPU."),
    workers: int = typer.Option(2, "--workers", "--read-workers", min=1, help="Threads reading the slide."),
    single_file: bool = typer.Option(False, "--single-file", help="Write one zip file instead of a directory (see formats/pzarr-v1.md)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (only once the new one is complete)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Compress a slide into a .pzarr container."""
    import json

    from wsicodec.pipeline.compress import compress as run

    with _user_errors():
        summary = run(slide, out, model=model, quant=quant, levels=levels, target_mpp=mpp, source_mpp=source_mpp,
                      all_tiles=all_tiles, batch_size=batch_size, device=device, read_workers=workers,
                      overwrite=overwrite, single_file=single_file, progress=not quiet and not json_out)
    if json_out:
        typer.echo(json.dumps(summary.to_json(), indent=2))
    else:
        typer.echo(summary.line())


@app.command()
def info(
    container: Path = typer.Argument(..., help="A .pzarr container."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Describe a .pzarr container: source, resolution, grid, model, quantiser, sizes."""
    import json

    from wsicodec.format.container import Container

    with _user_errors():
        description = Container.open(container).describe()
    if json_out:
        typer.echo(json.dumps(description, indent=2))
        return
    _print_tree(description)


def _print_tree(description: dict) -> None:
    from rich.console import Console
    from rich.tree import Tree

    def add(node: Tree, value) -> None:
        for key, item in value.items():
            if isinstance(item, dict):
                if item:
                    add(node.add(f"[bold]{key}[/bold]"), item)
            elif isinstance(item, list) and len(item) > 8:
                node.add(f"{key}: [{len(item)} values]")
            else:
                node.add(f"{key}: {item}")

    tree = Tree("[bold].pzarr container[/bold]")
    add(tree, {k: v for k, v in description.items() if k != "properties"})
    Console().print(tree)


@app.command("models")
def models_(json_out: bool = typer.Option(False, "--json")) -> None:
    """List the autoencoders wsicodec knows and whether their weights are available offline."""
    import json

    from wsicodec.models.registry import models_table

    with _user_errors():
        rows = models_table()
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for name in ("id", "f", "c", "offline", "class", "source"):
        table.add_column(name, no_wrap=True)
    table.add_column("description")
    for row in rows:
        table.add_row(row["id"], str(row["f"]), str(row["c"]), "yes" if row["offline"] else "no", row["class"],
                      str(row["source"]), row["description"])
    Console().print(table)


# ---------------------------------------------------------------- restore
@app.command()
def restore(
    container: Path = typer.Argument(..., help="A .pzarr container."),
    out: Path = typer.Argument(..., help="Output: a pyramidal .tiff/.svs, or with --region any image (.png, .tif, .jpg)."),
    region: Optional[tuple[int, int, int, int]] = typer.Option(
        None, "--region", metavar="X Y W H",
        help="Restore only this region: X Y in level-0 pixels of the archived resolution, W H in pixels of --level."),
    level: int = typer.Option(0, "--level", min=0, help="With --region: pyramid level N, a 2**N downsample."),
    quality: int = typer.Option(90, "--quality", min=1, max=100, help="JPEG quality of the TIFF tiles."),
    compression: str = typer.Option("jpeg", "--compression", help="TIFF tiles: jpeg | deflate | lzw | zstd (the last three lossless)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Decoder to use instead of the one the container records (registry name or folder)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: CUDA, then MPS, then CPU."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Tiles decoded per batch."),
    force: bool = typer.Option(False, "--force", help="Decode even if the decoder weights differ from the container's record."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (only once the new one is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Restore a viewable pyramidal TIFF (or a region) from a .pzarr container."""
    # the package's own `restore` function shadows the module name: import the functions
    from wsicodec.pipeline.restore import restore as _restore_tiff
    from wsicodec.pipeline.restore import restore_region as _restore_region

    with _user_errors():
        if region is not None:
            x, y, w, h = region
            _restore_region(container, out, x, y, w, h, level=level, device=device, batch_size=batch_size,
                            model=model, force=force, overwrite=overwrite)
            typer.echo(f"wrote {out} ({w}x{h} px at level {level})")
            return
        summary = _restore_tiff(container, out, compression=compression, quality=quality, device=device,
                                batch_size=batch_size, model=model, force=force, overwrite=overwrite,
                                progress=not quiet)
    typer.echo(summary.line())


# ---------------------------------------------------------------- stats
@app.command()
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
            report = st.container_stats(paths, price_per_tb_month=price, progress=not quiet)
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
@app.command("eval")
def eval_(
    inputs: list[Path] = typer.Argument(..., help="Slides (tissue tiles at --mpp) and/or images or folders of image tiles."),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="Registry name or local model folder; repeat for several. Default: the builtin model; 'none' for JPEG only."),
    quant: str = typer.Option("none,int8,kmeans", "--quant", help=f"Quantisers per model, comma-separated: {', '.join(KINDS)}; levels as kmeans:128, uniform:64."),
    jpeg: str = typer.Option("75,50,20,10", "--jpeg", help="JPEG qualities (Pillow), comma-separated; '' for none."),
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
                             embedders=list(embedder) if embedder else list(ev.DEFAULT_EMBEDDERS),
                             device=device, batch_size=batch_size, warn=warn, progress=note)
        # piped output (logs, CI) gets a wide table rather than rich's 80-column default
        Console(width=None if sys.stdout.isatty() else 160).print(report.rich_table())
        ev.write_report(report, csv_path=csv_out, json_path=json_out, markdown_path=markdown, plot_path=plot)
        for p in (csv_out, json_out, markdown, plot):
            if p is not None:
                note(f"wrote {p}")


@app.command()
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
@app.command()
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
    extra_data: Optional[list[str]] = typer.Argument(None, hidden=True),
) -> None:
    """Train an autoencoder (the builtin model's recipe) on your own slides or tiles."""
    with _user_errors():
        from wsicodec.research.train import TrainConfig, train as run_training

        cfg = TrainConfig(
            data=list(data) + list(extra_data or []), out=out, steps=steps, batch_size=batch_size, crop=crop,
            lr=lr, warmup=warmup, latent_channels=latent_channels, factor=factor, levels_noise=levels_noise,
            lpips_weight=lpips_weight, mse_weight=mse_weight, gan_after=gan_after, gan_weight=gan_weight,
            device=device, threads=threads, images_mpp=images_mpp, slide_mpp=slide_mpp, target_mpp=mpp,
            max_tiles=max_tiles, time_limit_min=time_limit, ckpt_every=ckpt_every, eval_every=eval_every, holdout=holdout,
            seed=seed, model_id=model_id, resume=resume,
        )
        folder = run_training(cfg)
        typer.echo(f"model folder: {folder}  (use --model {folder})")


if __name__ == "__main__":  # pragma: no cover
    app()
