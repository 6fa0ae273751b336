"""Command-line options shared by the ``samv2`` sub-commands: the model, device, precision and
embedding cache, and the session they open."""
from __future__ import annotations

import argparse

from .progress import progress_bar
from .session import EmbeddingSession

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --precision, --cache-dir, --progress."""
    parser.add_argument("--model", help="weights (.safetensors with its .json card); default: the bundled model")
    parser.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                        help="inference precision (auto: fp16 on CUDA, bf16 on CPUs with native bf16)")
    parser.add_argument("--cache-dir", help="keep embeddings on disk here (reused across runs; best effort: a cache "
                                            "that cannot be read or written never fails the command)")
    parser.add_argument("--progress", action="store_true",
                        help="one progress line per stage on stderr, for piped or logged output (a terminal "
                             "shows a bar without it)")


def session_from_args(args, allow_untrained: bool = False) -> EmbeddingSession:
    """The embedding session the parsed model arguments ask for (warns when untrained)."""
    return EmbeddingSession.open(args.model, device=args.device, precision=args.precision,
                                 cache_dir=getattr(args, "cache_dir", None), allow_untrained=allow_untrained,
                                 warn=True)


def embed_with_progress(session: EmbeddingSession, volume):
    """``session.embed(volume)`` with a progress bar on stderr."""
    with progress_bar(f"embedding {volume.name}") as update:
        return session.embed(volume, progress=update)
