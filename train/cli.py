"""``train``: the trainer's command line (its commands arrive with the trainer)."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train CNNs on imgprep shards."""
