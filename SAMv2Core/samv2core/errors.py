"""Exception types. Every user-facing failure is one of these, with a one-line message
naming the problem, so the CLI and the Slicer module can show it as it is."""
import argparse
import sys


class SAMv2Error(Exception):
    """Base class for all errors this package raises on purpose.

    The message's first line names the problem for a user; ``samv2`` prints it and exits 2.
    """


class InputError(SAMv2Error, ValueError):
    """Bad user input: wrong dimensionality, empty/constant image, NaN, point outside image..."""


class CheckpointError(SAMv2Error):
    """A weights file is missing, corrupt, of the wrong architecture or fails its checksum."""


class DeviceError(SAMv2Error):
    """A requested compute device (e.g. CUDA, or MPS) is not available or not usable."""


class MatchingError(SAMv2Error):
    """Matching cannot produce a result (e.g. no usable correspondences)."""


class RegistrationError(SAMv2Error):
    """Registration refused: the matches cannot support a transform, images do not overlap..."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error reported on one line (exit 2) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def os_error_message(exc: OSError) -> str:
    """One line for a file-system error: 'path: reason'."""
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or exc}".replace("\n", " ")


def run_cli(prog: str, action, interrupted: str = "interrupted") -> int:
    """Run a command-line action: a SAMv2Error, a file-system error (unwritable or full disk)
    or running out of memory becomes one ``prog: error: ...`` line on stderr and exit code 2,
    Ctrl-C exit code 130; otherwise the action's own exit code."""
    try:
        return int(action() or 0)
    except SAMv2Error as exc:
        print(f"{prog}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory (is the image much larger than expected? check its size and "
              "spacing)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
