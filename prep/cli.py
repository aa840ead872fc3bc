"""``imgprep``: make and inspect shards.

    imgprep shard /data/imagenet              # -> ./shards (or --out, or $IMGPREP_SHARDS)
    imgprep info                              # what ./shards holds
    imgprep verify                            # re-hash every shard against manifest.json

Set IMGPREP_DEBUG=1 to see the traceback behind a one-line error.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from prep import DEFAULT_SHARDS, SHARDS_ENV, __version__, refuse_an_empty_shards_variable, shards_folder
from prep.errors import report_errors
from prep.options import SEED, FolderOrFile
from prep.plan import ENCODINGS, ENGINES, POLICIES



def shards_argument(command):
    return click.argument(
        "shards", required=False, default=None, metavar="[SHARDS]",
        type=FolderOrFile(file_okay=False, path_type=Path, urls=True),
    )(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version=__version__, message="imgprep %(version)s")
def main():
    """Turn an ImageNet-style folder into HDF5 shards (256x256, or aspect kept), then inspect and check them."""


@main.command()
@click.argument("src", type=FolderOrFile(path_type=Path, urls=True))
@click.option("--out", type=FolderOrFile(file_okay=False, path_type=Path, urls=True), envvar=SHARDS_ENV,
              default=DEFAULT_SHARDS, show_default=True, show_envvar=True,
              help="Output folder, or a URL (s3://bucket/prefix: written in the local cache folder "
                   "~/.cache/imgprep, then uploaded, the manifest last).")
@click.option("--size", default=256, show_default=True, help="Output side in pixels.")
@click.option("--policy", type=click.Choice(POLICIES), default="crop", show_default=True,
              help="crop: shorter side to SIZE, then the central SIZE x SIZE (the paper). "
                   "squash: both sides to SIZE, aspect ratio lost (Caffe's warp). "
                   "keep: shorter side to SIZE, the whole image kept (for RandomResizedCrop recipes), the "
                   "longer side cut centrally to at most --max-aspect x SIZE.")
@click.option("--max-aspect", default=2.0, show_default=True, type=click.FloatRange(1, 64),
              help="--policy keep: longest side / shorter side kept (a 3000x300 panorama becomes 512x256).")
@click.option("--encoding", type=click.Choice(ENCODINGS), default="raw", show_default=True,
              help="raw: uint8 pixels (~192 KiB an image at 256; fastest to read). "
                   "jpeg: re-encoded at --quality (~10x smaller; decoded when read).")
@click.option("--quality", default=90, show_default=True, help="JPEG quality 1-100 for --encoding jpeg.")
@click.option("--shard-size", default=1024, show_default=True, help="Source files per shard file.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the order of files across shards.")
@click.option("--max-pixels", default=100_000_000, show_default=True,
              help="Reject files whose decoded width x height exceeds this (decompression bombs).")
@click.option("--workers", default=None, type=int, help="Processes.  [default: all cores]")
@click.option("--val-labels", type=FolderOrFile(dir_okay=False, path_type=Path, urls=True),
              help="Labels for a flat SRC/val: lines 'filename wnid', or a CSV with those two columns "
                   "(a file, or an object's s3:// URL).")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: a process pool of --workers. ray: the same tasks on a Ray cluster (pip install "
                   "'imgprep[ray]'); every worker must see SRC at the same path, and --out too unless it is a URL "
                   "(each worker then uploads its shards).")
@click.option("--ray-address", help="Ray cluster to join ('auto': the running one; default: start a local one).")
@click.option("--overwrite", is_flag=True,
              help="First delete what imgprep wrote in --out (shards, manifest, rejects, stats); "
                   "needed when --out holds shards made with other options or from another source.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@report_errors
def shard(src, out, size, policy, max_aspect, encoding, quality, shard_size, seed, max_pixels, workers, val_labels,
          engine, ray_address, overwrite, quiet):
    """Resize every image of SRC into HDF5 shards in --out.

    \b
    SRC layouts:
      SRC/train/<wnid>/*  and  SRC/val/<wnid>/*
      SRC/train/<wnid>/*  and  a flat SRC/val/* with --val-labels FILE
      SRC/ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz
          (read in place, never extracted; validation labels from the devkit)
      SRC/ILSVRC/Data/CLS-LOC/{train,val} with SRC/LOC_val_solution.csv (Kaggle)
      SRC/data/{train,validation}-NNNNN-of-NNNNN.parquet (Hugging Face datasets, read in
          place; the unlabelled test split is skipped)
      SRC/*-train-*.tar and SRC/*-validation-*.tar (webdataset: KEY.jpg + KEY.cls)
      SRC/train_images_N.tar.gz and val_images.tar.gz (Hugging Face's ImageNet archives:
          decompressed once into OUT/.partial, which needs their size free meanwhile)
      s3://bucket/prefix holding any of these: a tree (Kaggle's too) listed once and read an
          image a request, the tars and parquet files read in place by range requests, the
          .tar.gz archives streamed to list them, then into OUT/.partial; pip install 'imgprep[cloud]'
    Class names come from SRC/LOC_synset_mapping.txt, synset_words.txt or words.txt (or the
    devkit) if present.

    Every image is decoded as RGB whatever it is (CMYK, greyscale, palette, alpha, 16-bit, a PNG
    named .JPEG), resized with antialiased bicubic resampling and cut per --policy. EXIF
    orientation is ignored, as it was when ImageNet was labelled. Files that cannot be used
    (empty, truncated, not images, over --max-pixels) are listed with the reason in
    OUT/rejects.jsonl and do not stop the run. Interrupted? Run the same command again: finished
    shards are kept. The same input and options always give byte-identical shards.
    """
    from prep.errors import escaped
    from prep.job import run_shard_job
    from prep.lifeline import sigterm_as_interrupt
    from prep.plan import ShardOptions
    from prep.pool import usable_cores
    from prep.sources import scan_source

    if click.get_current_context().get_parameter_source("out") is click.core.ParameterSource.DEFAULT:
        refuse_an_empty_shards_variable()  # click takes an empty $IMGPREP_SHARDS for unset
    options = ShardOptions(size=size, policy=policy, encoding=encoding, quality=quality,
                           shard_size=shard_size, seed=seed, max_pixels=max_pixels, max_aspect=max_aspect)
    workers = workers or usable_cores()
    settings = " ".join(f"{k}={v}" for k, v in options.as_dict().items())
    click.echo(f"imgprep shard {escaped(src)} -> {escaped(out)}  ({settings} " + (f"workers={workers})" if engine == "local"
                                                                  else f"engine=ray address={ray_address or 'local'})"))
    dataset = scan_source(src, val_labels)
    found = ", ".join(f"{len(items):,} {split}" for split, items in dataset.splits.items())
    click.echo(f"found {found} files in {len(dataset.classes):,} classes; "
               f"{len(dataset.rejects):,} left out while scanning")
    url = out if isinstance(out, str) else None
    if url is not None and engine == "ray":
        refuse_local_staging(dataset, url)
    if url is not None:  # staged where a Loader on this machine will look for the URL's files
        from prep.cache import ShardCache

        staging = ShardCache(url)
        staging.remote.check_reachable()
        out = staging.root
    with sigterm_as_interrupt():  # a scheduler's SIGTERM: stop workers, keep finished shards, say so
        summary = run_shard_job(dataset, out, options, workers, overwrite, progress=not quiet, engine=engine,
                                ray_address=ray_address, upload_to=url if engine == "ray" else None)
        if url is not None:
            from prep.upload import upload_shards

            sent = upload_shards(out, url, progress=not quiet)
            if engine == "ray":  # the workers uploaded the shards as they made them
                click.echo(f"{summary.shards} shard files are in {escaped(url)}, uploaded by the Ray workers")
            else:
                click.echo(f"uploaded {sent.files} shard files ({human_bytes(sent.bytes)}) to {escaped(url)}"
                           + (f"; {sent.kept} were there already" if sent.kept else ""))
    written = ", ".join(f"{n:,} {split}" for split, n in summary.counts.items())
    if summary.already_complete:
        click.echo(f"{escaped(out)} is already complete ({written} images); nothing to do")
        return
    rate = sum(summary.counts.values()) / max(summary.seconds, 1e-9)
    click.echo(f"wrote {written} images in {summary.shards} shards ({human_bytes(summary.bytes)}) "
               f"in {summary.seconds:.1f} s ({rate:,.0f} img/s)"
               + (f", {summary.resumed} shards kept from an earlier run" if summary.resumed else ""))
    if summary.rejected:
        click.echo(f"rejected {summary.rejected:,} files: reasons in {escaped(summary.out / 'rejects.jsonl')}")


def refuse_local_staging(dataset, url: str) -> None:
    """Ray's workers upload to a bucket --out from their own disks, and never see this machine's:
    a source decompressed here first (Hugging Face's .tar.gz archives) cannot be read there."""
    from prep.errors import PrepError
    from prep.sources.hf_archives import StagedArchives

    if isinstance(dataset.reader, StagedArchives):
        raise PrepError(f"--engine ray with --out {url}: {dataset.root}'s .tar.gz archives are decompressed on this "
                        "machine's disk, which the Ray workers do not see; give a --out folder that every worker sees, "
                        "or --engine local")


@main.command("pca-stats")
@shards_argument
@click.option("--split", default="train", show_default=True, help="Split to measure.")
@click.option("--workers", default=None, type=int, help="Processes.  [default: all cores]")
@click.option("--sample", default=None, type=click.IntRange(min=1),
              help="Use a seeded random subset of N images.  [default: all]")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of --sample.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@report_errors
def pca_stats(shards, split, workers, sample, seed, quiet):
    """Exact RGB mean, std, mean image and covariance eigen-decomposition of a split.

    Writes SHARDS/stats.json and SHARDS/stats-mean.npy (the S x S x 3 float64 mean image),
    all on the 0-255 scale. Every pixel counts, summed as integers, so the result does not
    depend on --workers. stats.json records the sha256 of manifest.json, so readers notice
    when the shards have changed since. SHARDS defaults to $IMGPREP_SHARDS, else ./shards.
    """
    from prep.errors import escaped
    from prep.pool import usable_cores
    from prep.stats import compute_stats

    root = url = shards_folder(shards)
    if isinstance(url, str):  # a URL: measured on the cached files, the two results uploaded
        from prep.upload import fetch_split

        root = fetch_split(url, split, progress=not quiet)
    workers = workers or usable_cores()
    click.echo(f"imgprep pca-stats {escaped(url)}  (split={split} workers={workers} "
               f"sample={sample or 'all'} seed={seed})")
    stats = compute_stats(root, split, workers, sample, seed, progress=not quiet)
    if isinstance(url, str):
        from prep.upload import upload_stats

        upload_stats(root, url)
    rows = [("mean 0-255", stats["mean"], 1), ("mean 0-1", stats["mean"], 255),
            ("std 0-255", stats["std"], 1), ("std 0-1", stats["std"], 255)]
    click.echo(f"\n{'':12}{'R':>10}{'G':>10}{'B':>10}")
    for name, values, divisor in rows:
        click.echo(f"{name:12}" + "".join(f"{v / divisor:>10.4f}" for v in values))
    click.echo("\neigenvalues  0-255 scale: " + "  ".join(f"{v:.4f}" for v in stats["eigval"])
               + "\n             0-1 scale:   " + "  ".join(f"{v / 255**2:.6f}" for v in stats["eigval"]))
    click.echo("eigenvectors (column i belongs to eigenvalue i):")
    for row in stats["eigvec"]:
        click.echo("             " + "".join(f"{v:>10.4f}" for v in row))
    click.echo(f"\n{stats['images']:,} images, {stats['pixels']:,} pixels in {stats['seconds']:.1f} s; "
               f"wrote {root / 'stats.json'}" + (f" and {root / stats['mean_image']}" if stats["mean_image"] else ""))


@main.command()
@shards_argument
@click.option("--out", type=FolderOrFile(dir_okay=False, path_type=Path), default=Path("preview.png"),
              show_default=True, help="PNG file to write.")
@click.option("--split", default="train", show_default=True, help="Split to draw images from.")
@click.option("--images", default=6, show_default=True, type=click.IntRange(1, 100),
              help="Rows: images drawn at random (seeded); at most the split's size.")
@click.option("--versions", default=5, show_default=True, type=click.IntRange(1, 20),
              help="Augmented versions of each image.")
@click.option("--lighting", default=0.1, show_default=True, type=click.FloatRange(min=0),
              help="Std of the PCA-lighting alpha (the paper's 0.1 is subtle; try 1 to see its direction).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the images and of their augmentation.")
@click.option("--crop", type=int, help="Window side in pixels.  [default: 224 for 256-px shards, 7/8 of the side]")
@report_errors
def preview(shards, out, split, images, versions, lighting, seed, crop):
    """Draw shard images beside augmented training versions of each, as a PNG grid.

    Each row: the image as stored (256 x 256), then VERSIONS views of it as the training loader
    makes them (random 224 x 224 window, mirror, PCA lighting; shown before normalisation).
    SHARDS defaults to $IMGPREP_SHARDS, else ./shards.
    """
    from augment.preview import make_preview

    path, rows = make_preview(shards_folder(shards), out, split, images, versions, lighting, seed, crop)
    click.echo(f"wrote {path} ({rows} images x {versions} augmented versions)")


@main.command()
@shards_argument
@report_errors
def info(shards):
    """Show what a shard folder holds: splits, counts, classes, size on disk, options, rejects.

    SHARDS defaults to $IMGPREP_SHARDS, else ./shards.
    """
    from prep.errors import PrepError, escaped
    from prep.shards import read_manifest, read_rejects

    root = where = shards_folder(shards)
    sizes = None
    if isinstance(root, str):  # a URL: its manifest, rejects and stats are fetched into the cache
        from prep.cache import ShardCache

        cache = ShardCache(root)
        root = cache.prepare()
    manifest = read_manifest(root)  # every name in it may come from a file: each printed escaped
    if isinstance(where, str):
        from prep.shards import shard_entries

        sizes = cache.sizes([e["file"] for e in shard_entries(manifest)])
    click.echo(escaped(f"{where}  ({manifest['format']} v{manifest['version']}, made by {manifest.get('tool', '?')})"))
    click.echo(escaped(f"source   {manifest.get('source', '?')}"))
    click.echo(escaped("options  " + " ".join(f"{k}={v}" for k, v in manifest["options"].items())))
    classes = manifest["classes"]
    shown = ", ".join(f"{c['wnid']}" + (f" ({c['name']})" if c["name"] else "") for c in classes[:3])
    click.echo(escaped(f"classes  {len(classes):,}: {shown}{', ...' if len(classes) > 3 else ''}"))
    click.echo(f"\n{'split':8}{'images':>12}{'shards':>8}{'on disk':>12}{'rejected':>10}")
    for split, entry in manifest["splits"].items():
        if sizes is not None:
            size = sum(sizes[e["file"]] for e in entry["shards"])
        else:
            size = sum((root / e["file"]).stat().st_size for e in entry["shards"] if (root / e["file"]).exists())
        count = sum(e["count"] for e in entry["shards"])
        click.echo(f"{escaped(split):8}{count:>12,}{len(entry['shards']):>8}{human_bytes(size):>12}{entry.get('rejected', 0):>10,}")
    try:
        rejects = read_rejects(root)
    except PrepError as error:
        rejects = []
        click.echo(f"\nrejects  unreadable: {escaped(error)}")
    if rejects:
        click.echo(f"\nrejected files by reason (all in {escaped(root / 'rejects.jsonl')}):")
        kinds = Counter(r["reason"].split(":")[0] for r in rejects)
        for reason, count in kinds.most_common(8):
            example = next(r["path"] for r in rejects if r["reason"].split(":")[0] == reason)
            click.echo(f"{count:>8,}  {escaped(reason)}  (e.g. {escaped(example)})")
    click.echo(f"\nstats    {escaped(stats_state(root))}")


def stats_state(root: Path) -> str:
    """One phrase: whether root's stats.json is there and usable."""
    from prep.errors import PrepError
    from prep.shards import STATS, open_shards
    from prep.stats import load_stats

    if not (root / STATS).exists():
        return "none yet (imgprep pca-stats)"
    try:
        load_stats(root, with_mean_image=open_shards(root).square)
    except PrepError as error:
        return f"present but unusable: {error}"
    return "present, computed from these shards"


@main.command()
@shards_argument
@report_errors
def verify(shards):
    """Re-hash every shard of SHARDS against manifest.json and open each with the checked reader
    (its attributes, labels, image table, nothing stored outside it); exit 1 naming each problem.

    SHARDS defaults to $IMGPREP_SHARDS, else ./shards. A URL (s3://bucket/prefix) is verified
    through its local cache: each file is downloaded (once) and checked there.
    """
    from tqdm import tqdm

    from prep.errors import ShardFormatError
    from prep.shards import open_shards, sha256_file, shard_entries

    root = shards_folder(shards)
    if isinstance(root, str):
        return verify_remote(root)
    shard_set = open_shards(root)
    entries = shard_entries(shard_set.manifest)
    present = [e for e in entries if (root / e["file"]).is_file()]
    problems = [f"missing: {root / e['file']}" for e in entries if e not in present]
    total = sum((root / e["file"]).stat().st_size for e in present)
    readers = {split: shard_set.split(split) for split in shard_set.splits}
    by_file = {e["file"]: e for e in present}
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", dynamic_ncols=True) as bar:
        for split, reader in readers.items():
            for file_no, name in enumerate(reader.files):
                entry = by_file.get(name)
                if entry is None:
                    continue
                if sha256_file(root / name, on_bytes=bar.update) != entry["sha256"]:
                    problems.append(f"sha256 mismatch: {root / name}")
                    continue
                try:
                    reader.shard_file(file_no)
                except ShardFormatError as error:
                    problems.append(f"unreadable: {error}")
            reader.close()
    verdict(problems, f"ok: {len(entries)} shards, {human_bytes(total)}, all match {root / 'manifest.json'}")


def verify_remote(url: str) -> None:
    """``imgprep verify URL``: every shard fetched through the cache (which checks its sha256)
    and opened with the checked reader; exit 1 naming each problem."""
    from tqdm import tqdm

    from prep.errors import PrepError
    from prep.shards import open_shards, shard_entries

    shard_set = open_shards(url)
    problems, total = [], 0
    for split in shard_set.splits:
        reader = shard_set.split(split)
        for file_no in tqdm(range(len(reader.files)), desc=f"verify {split}", unit="shard", dynamic_ncols=True):
            try:
                reader.shard_file(file_no)
                total += reader.file_bytes[file_no]
            except PrepError as error:  # a sha256 mismatch (twice), a failed request, a damaged shard
                problems.append(f"unreadable: {error}")
        reader.close()
    count = len(shard_entries(shard_set.manifest))
    verdict(problems, f"ok: {count} shards, {human_bytes(total)}, all match {url}/manifest.json")


def verdict(problems: list[str], ok: str) -> None:
    """verify's ending: each problem on stderr and exit 1, or the ``ok`` line."""
    from prep.errors import escaped

    for problem in problems:
        click.echo(escaped(problem), err=True)
    if problems:
        raise SystemExit(1)
    click.echo(escaped(ok))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


if __name__ == "__main__":
    main()
