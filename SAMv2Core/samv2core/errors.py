"""Exception types. Every user-facing failure is one of these, with a one-line message
naming the problem, so the CLI and the Slicer module can show it as it is."""


class SAMv2Error(Exception):
    """Base class for all errors this package raises on purpose."""


class InputError(SAMv2Error, ValueError):
    """Bad user input: wrong dimensionality, empty/constant image, NaN, point outside image..."""


class CheckpointError(SAMv2Error):
    """A weights file is missing, corrupt, of the wrong architecture or fails its checksum."""


class DeviceError(SAMv2Error):
    """A requested compute device (e.g. CUDA) is not available."""


class MatchingError(SAMv2Error):
    """Matching cannot produce a result (e.g. no usable correspondences)."""


class RegistrationError(SAMv2Error):
    """Registration refused: the matches cannot support a transform, images do not overlap..."""


def run_cli(prog: str, action, interrupted: str = "interrupted") -> int:
    """Run a command-line action: a SAMv2Error becomes one ``prog: error: ...`` line on stderr
    and exit code 2, Ctrl-C exit code 130; otherwise the action's own exit code."""
    import sys

    try:
        return int(action() or 0)
    except SAMv2Error as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
