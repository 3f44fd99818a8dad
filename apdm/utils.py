"""Small shared helpers: logging, progress bars, atomic writes, optional imports, seeding, devices.

Kept dependency-light: importing this module imports neither torch nor diffusers; the functions that need
torch import it inside.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:  # annotations only; torch is imported inside the functions that need it
    import torch

LOG = logging.getLogger("apdm")

#: Global switch for progress bars; the CLI sets it from ``quiet=true``.
_PROGRESS_DISABLED = False


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message says which pip extra provides it."""


def optional_import(module: str, extra: str, purpose: str = ""):
    """Import ``module`` or raise :class:`MissingDependency` naming the extra that installs it.

    Args:
        module: dotted module name, e.g. ``"brisque"``.
        extra: the apdm extra that provides it, e.g. ``"metrics"`` (-> ``pip install 'apdm[metrics]'``).
        purpose: what it is needed for, put into the error message.
    """
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising something else at import
        why = f" for {purpose}" if purpose else ""
        raise MissingDependency(
            f"'{module}' is needed{why} but could not be imported ({type(exc).__name__}: {exc}). "
            f"Install it with: pip install 'apdm[{extra}]'  (on CPU-only machines add torch=={_torch_pin()} "
            f"to the same pip command so pip does not replace torch)."
        ) from exc


def _torch_pin() -> str:
    """The installed torch's version without its local tag (``2.13.0+cpu`` -> ``2.13.0``), for install hints."""
    try:
        from importlib.metadata import version

        return version("torch").split("+")[0]
    except (ImportError, ValueError):  # no torch metadata (PackageNotFoundError): the version we test with
        return "2.13.0"


_TRUE_WORDS, _FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(text: str) -> bool:
    """``"true"``/``"1"``/``"yes"``/``"on"`` -> True, ``"false"``/``"0"``/``"no"``/``"off"`` -> False (any case,
    outer spaces ignored: the words YAML reads as booleans in recipes, and 1/0); anything else raises ValueError,
    so a typo such as ``long_attack=ture`` is refused instead of silently read as false."""
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not true or false")


def set_progress(enabled: bool) -> None:
    """Globally enable or disable tqdm progress bars (``quiet=true`` disables them)."""
    global _PROGRESS_DISABLED
    _PROGRESS_DISABLED = not enabled


def progress_enabled() -> bool:
    """Whether progress bars are shown (see :func:`set_progress`)."""
    return not _PROGRESS_DISABLED


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, **kwargs):
    """A tqdm progress bar that honours the global quiet switch. Returns the tqdm object."""
    from tqdm.auto import tqdm

    kwargs["disable"] = bool(kwargs.get("disable")) or _PROGRESS_DISABLED
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, desc=desc, total=total, **kwargs)


class _TqdmHandler(logging.Handler):
    """Writes each record to stderr through ``tqdm.write``, so a log line printed while a progress bar is open gets
    its own line (and the bar is redrawn below it) instead of landing on the bar's line. stderr is looked up at
    each record (where the bars go too)."""

    def emit(self, record: logging.LogRecord) -> None:
        import sys

        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def _no_torchvision_notice(record: logging.LogRecord) -> bool:
    """transformers says on every model load that its image processors fall back to PIL without torchvision, which
    apdm leaves out of the default install on purpose (its image processors are never used)."""
    return "requires torchvision (not installed)" not in record.getMessage()


def setup_logging(level: str = "INFO") -> None:
    """Configure the ``apdm`` logger to print plain ``[apdm] message`` lines on stderr (through ``tqdm.write``:
    never on a progress bar's line), and drop transformers' notice that torchvision is not installed."""
    if not LOG.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("[apdm] %(message)s"))
        LOG.addHandler(handler)
    LOG.setLevel(level.upper())
    LOG.propagate = False
    notices = logging.getLogger("transformers.utils.import_utils")
    if _no_torchvision_notice not in notices.filters:
        notices.addFilter(_no_torchvision_notice)


# --------------------------------------------------------------------------------------------- files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``). A file
    replaced keeps its permissions (a log the user made private stays private); a new one gets those ``open()``
    would give it. A symlink at ``path`` is replaced by the file, never written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.lstat(path).st_mode) if path.is_file() and not path.is_symlink() else None
    except OSError:
        mode = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic JSON write, pretty-printed, keys kept in insertion order."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def finite_json(value, path: str = "") -> tuple:
    """``(copy of value, {path: "inf" | "-inf" | "nan"})``: every non-finite float of a result (dicts and lists
    walked, numpy scalars and 0-d tensors read as numbers, ``path`` as ``key.sub[2]``) replaced by ``None``, which
    strict JSON can hold (``Infinity`` and ``NaN`` are not JSON; Python's json module writes them unless
    ``allow_nan=False``). The one walk for the benchmarks' JSON and ``apdm evaluate``'s."""
    import math

    bad: dict[str, str] = {}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k], sub = finite_json(v, f"{path}.{k}" if path else str(k))
            bad.update(sub)
        return out, bad
    if isinstance(value, (list, tuple)):
        out = []
        for i, v in enumerate(value):
            item, sub = finite_json(v, f"{path}[{i}]")
            out.append(item)
            bad.update(sub)
        return out, bad
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy scalar or 0-d tensor: a number
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None, {path: str(value)}
    return value, bad


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _remove(path: Path) -> None:
    """Remove ``path`` whatever it is (a folder, a file, a link, nothing); errors are ignored (it is litter)."""
    import shutil

    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and move it to ``final`` only when the block succeeds.

    An existing ``final`` is replaced only after the new one is complete (it is renamed aside, then
    deleted), so a crash never leaves a half-written model directory under the final name. Its files get the
    permissions ``open()`` would give them: safetensors writes its files 0600 (owner only), which kept a model from
    another account that serves it. A ``final`` that is a symlink (a model folder linked to a bigger disk) is
    written through: the folder it points to is replaced and the link stays.
    """
    final = Path(final)
    if final.is_symlink():  # was replaced by a local folder (the link left as .name.old), then failed in rmtree
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the permissions mkdir() would
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, mode)
        if final.exists():
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
            _remove(old)  # a stale one from an earlier run
    except BaseException:
        _remove(tmp)
        if old.exists() and not final.exists():  # stopped between the two renames: put the old one back
            os.replace(old, final)
        raise


def cache_dir() -> Path:
    """User cache directory for apdm (``$APDM_CACHE`` or ``$XDG_CACHE_HOME/apdm`` or ``~/.cache/apdm``)."""
    root = os.environ.get("APDM_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "apdm"


# ----------------------------------------------------------------------------------- torch helpers
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device=None) -> Iterator[None]:
    """Run a block whose random draws come from torch's *global* RNG (library initialisers such as peft's LoRA
    init) with that RNG seeded to ``seed``, restoring the caller's RNG state afterwards: the block's result then
    depends on ``seed`` only, not on what ran before it in the process. ``device``: the CUDA device the block
    draws on, if any (its RNG is forked and seeded too)."""
    import torch

    cuda = []
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        cuda = [index if index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed would reseed all GPUs)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)  # this device's generator
        yield


def select_device(device: str = "auto"):
    """``"auto"`` -> CUDA if available, else MPS, else CPU. Returns a ``torch.device``.

    A device this machine does not have (``cuda`` without CUDA, ``cuda:3`` with two GPUs, ``mps`` off Apple
    silicon) is refused here, before any model is loaded, rather than failing inside torch later.

    Raises:
        RuntimeError: the device is unknown or not available here; the message says which devices are.
    """
    import torch

    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise RuntimeError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps") from exc
        fallback = "use model.device=cpu or model.device=auto (in apdm bench: device=cpu or device=auto)"
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
                raise RuntimeError(f"device '{device}': CUDA is not available here{build}; {fallback}")
            count = torch.cuda.device_count()
            if dev.index is not None and dev.index >= count:
                raise RuntimeError(f"device '{device}': CUDA device index {dev.index} does not exist; there are "
                                   f"{count} (cuda:0 to cuda:{count - 1}); use one of them, cuda, or auto")
        elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                        and torch.backends.mps.is_available()):
            raise RuntimeError(f"device '{device}': MPS (Apple silicon) is not available here; {fallback}")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def select_dtype(dtype: str, device) -> "torch.dtype":
    """Resolve ``"auto"|"fp32"|"fp16"|"bf16"`` for ``device``.

    ``auto`` gives bf16 on CUDA devices that support it, fp16 on other CUDA devices, fp32 elsewhere (CPU
    half precision is slow and inaccurate for training).
    """
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype != "auto":
        if dtype not in table:
            raise ValueError(f"unknown dtype '{dtype}', expected one of auto, fp32, fp16, bf16")
        return table[dtype]
    if getattr(device, "type", str(device)) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype) -> str:
    """``torch.float16`` -> ``"fp16"`` (the spelling configs use)."""
    return {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(dtype), "fp32")


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process in MiB (Linux/macOS); ``children``: of the largest of its child
    processes that have ended (e.g. a benchmark's spawned workers)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def provenance() -> dict:
    """What produced a result file, for anyone who reads it later: apdm's version and git commit (when run from a
    checkout), the versions of torch, diffusers and transformers, Python, and the machine (platform, CPU, GPU).
    Cheap (no model loaded); the git commit is None outside a checkout or without git."""
    import platform
    import subprocess
    from importlib import metadata

    import torch

    import apdm

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    here = Path(apdm.__file__).resolve().parent.parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=False)

    commit = None
    try:
        if (here / ".git").exists():
            head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
            if head.returncode == 0:
                commit = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"apdm": apdm.__version__, "git_commit": commit, "torch": torch.__version__,
            "diffusers": version("diffusers"), "transformers": version("transformers"),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
