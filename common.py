"""Plumbing shared by every script: typed config files, --help from field comments, one-line user errors,
downloads and atomic saves, run folders' settings and RNG state. Imports no project module.

    cfg = common.load_config("configs/demo.yaml", ["model.num_pauses=4"], {"model": ModelConfig, ...})
    parser = common.Parser(__doc__, SECTIONS)        # argparse: --help lists every key; errors are user errors
    common.run_cli(main, sys.argv[1:])               # a user error ends as one line `error: ...`, exit code 2
"""

import argparse
import dataclasses
import gzip
import hashlib
import inspect
import io
import json
import os
import random
import re
import sys
import tempfile
import tokenize
import typing
import urllib.request
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm


class DownloadError(OSError):
    """A download that failed (network, size, checksum, a broken gzip): a user error, nothing was saved."""


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, DownloadError)   # what this project raises for
                                                                                 # user mistakes

# ----------------------------------------------------------------------------------------------
# Files: downloads into a temporary file renamed into place only when complete; atomic saves


def download(url: str, dest, desc: str = "", sha256: str | None = None) -> Path:
    """Fetch url (http(s):// or file://) to dest atomically; a failure leaves no partial file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            got, digest = 0, hashlib.sha256()
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc or dest.name, disable=None) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got != total:
            raise OSError(f"connection closed early: got {got} of {total} bytes")
        if sha256 and digest.hexdigest() != sha256:
            raise OSError(f"sha256 mismatch: got {digest.hexdigest()}, expected {sha256}")
        if dest.name.endswith(".gz") or is_gzip(tmp):
            with gzip.open(tmp, "rb") as g:  # the whole stream must decompress
                while g.read(1 << 22):
                    pass
        os.replace(tmp, dest)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise DownloadError(f"download of {url} failed ({type(e).__name__}: {e}); nothing was saved") from e
        raise
    return dest


def is_gzip(path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def atomic_save(obj, path: Path):
    """torch.save to a temporary file, then rename: a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Config files: YAML sections merged onto the typed defaults of each module's dataclass

def _check_type(key: str, value, hint):
    """Return value converted to the field's type, or raise naming the key. Ints pass as floats."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and type(value) is hint:
        return value
    raise ValueError(f"{key} must be {hint.__name__}, got {value!r}")


def load_config(path, overrides=(), sections=None, ignore=()):
    """Read a YAML config and dotted `section.key=value` overrides onto dataclass defaults.

    sections: {"data": DataConfig, ...}; ignore: section names allowed in the file but not used by
    the caller (e.g. evaluate.py --baselines has no use for `model`). Returns {section: instance}.
    Unknown sections or keys and wrong types raise ValueError naming where they came from: the file,
    or the command line and the override that set them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}; pass a YAML config such as configs/demo.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    given = {}   # "section" and "section.key" -> the override that set it (the last one wins)
    for item in overrides:  # "model.num_pauses=8": the value is parsed as YAML, so 8 is an int
        key, eq, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not (eq and dot and field):
            raise ValueError(f"command line: override {item!r} must look like section.key=value")
        if section in ignore:
            raise ValueError(f"command line: override {item!r}: section '{section}' is not used by this command")
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ValueError(f"{path}: section '{section}' must be a mapping")
        raw[section][field] = yaml.safe_load(value)
        given[section] = given[key] = item

    def blame(key, problem):   # "<where>: <problem> (from <override>)": the file, or the override that set key
        return f"command line: {problem} (from {given[key]})" if key in given else f"{path}: {problem}"

    valid = sorted(sections) + sorted(ignore)
    for section in raw:
        if section not in valid:
            raise ValueError(blame(section, f"unknown section '{section}'") + f"; valid sections: {', '.join(valid)}")
    config = {}
    for section, cls in sections.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section '{section}' must be a mapping")
        hints = typing.get_type_hints(cls)
        checked = {}
        for key, value in values.items():
            name = f"{section}.{key}"
            if key not in hints:
                raise ValueError(blame(name, f"unknown key '{name}'") + "; valid keys: "
                                 + ", ".join(f"{section}.{k}" for k in hints))
            try:
                checked[key] = _check_type(name, value, hints[key])
            except ValueError as e:
                raise ValueError(blame(name, str(e))) from None
        config[section] = cls(**checked)
    return config


# ----------------------------------------------------------------------------------------------
# Run folders: a saved config.yaml against a new or resumed run's settings; the RNG state that last.pt keeps

def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def changed_settings(saved: dict, resolved: dict, sections=("data", "sid", "model"), ignore=()) -> list[str]:
    """'section.key: old -> new' for every setting of `sections` that differs from a saved config.yaml.
    Where files live (data.dir, model.hf_dir, *_url, data.download) may change; keys new since, and the
    'section.key' names in `ignore`, are skipped."""
    return [f"{s}.{k}: {saved[s][k]!r} -> {v!r}" for s in sections for k, v in resolved[s].items()
            if k in saved.get(s, {}) and saved[s][k] != v and f"{s}.{k}" not in ignore
            and not (k in ("dir", "download") or k.endswith(("_dir", "_url")))]


# Settings that name a run or say what runs it: a run moved to another machine is the same run
# (bench.py and paper.py reuse it).
RUN_KEYS = ("train.name", "train.out_dir", "train.sid_cache", "train.device", "train.threads", "train.resume")
# What a resumed run may change besides: how often it logs, the evaluation batch. Anything else (the schedule:
# epochs, batch_size, lr, ..; the seed; eval.select, ks, every) would break the epoch arithmetic of last.pt's step,
# or compare its `best` with another metric.
RESUME_MAY_CHANGE = RUN_KEYS + ("train.log_every", "eval.batch_size")


def check_resume(run_dir: Path, resolved: dict):
    """last.pt continues only the run it was saved by: name every setting that changed (RESUME_MAY_CHANGE aside)."""
    changed = changed_settings(yaml.safe_load((run_dir / "config.yaml").read_text()), resolved,
                               ("data", "sid", "model", "eval", "train"), RESUME_MAY_CHANGE)
    if changed:
        raise ValueError(f"{run_dir / 'last.pt'} comes from another config ({'; '.join(changed)}): resume with "
                         f"the saved settings, or start a new run with train.name=<other>")


def check_run_dir(run_dir: Path, resume: bool, resolved: dict):
    """A new run needs a folder without a run in it; a resumed one needs last.pt of the same settings."""
    last_path = run_dir / "last.pt"
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"train.resume=true but {last_path} does not exist: drop train.resume=true "
                                f"to start the run, or pass the train.name of the run to continue")
    if not resume and last_path.is_file():
        raise FileExistsError(f"{run_dir} holds a run already: pass train.resume=true to continue it, "
                              f"or train.name=<other> to start a new one")
    if resume:
        check_resume(run_dir, resolved)


# ----------------------------------------------------------------------------------------------
# Command line: --help from the config dataclasses, user errors as one line

def field_comments(cls) -> dict[str, str]:
    """{field: its trailing `# comment`} of a dataclass, read from its source. A comment-only line
    indented deeper than the fields continues the comment of the field above; a comment-only line at
    the fields' indentation is a heading and belongs to no field."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):   # no source file (a frozen or .pyc-only install): keys and defaults only
        return {}
    # tokenize, not a regex alone, finds the comments: a default string may hold a '#'
    on_line = {t.start[0]: t.string.lstrip("#").strip()
               for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    comments, field, indent = {}, None, 0
    for i, line in enumerate(source.splitlines(), 1):
        depth = len(line) - len(line.lstrip())
        if m := re.match(r"\s*(\w+)\s*:", line):   # `name: type = default  # comment`
            field, indent = m.group(1), depth
            if i in on_line:
                comments[field] = on_line[i]
        elif field and i in on_line and depth > indent:   # the comment goes on, under the field above
            comments[field] = (comments.get(field, "") + " " + on_line[i]).strip()
        else:
            field = None
    return comments


def config_help(sections: dict) -> str:
    """Every `section.key=default  meaning` of sections ({"data": DataConfig, ...}), one per line."""
    lines = []
    for name, cls in sections.items():
        comments = field_comments(cls)
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = json.dumps(default) if isinstance(default, (list, bool)) else str(default)
            lines.append((f"  {name}.{f.name}={value}".ljust(32) + f"  {comments.get(f.name, '')}").rstrip())
    return "\n".join(lines)


TRACEBACK_NOTE = ("A user error (bad value, missing file, ...) ends as one line `error: ...` on stderr and exit "
                  "code 2; PAUSEREC_TRACEBACK=1 shows its traceback instead.")


def cli_help(doc: str, sections: dict) -> str:
    """What --help prints: the script's docstring, then every config key with its default and meaning."""
    keys = f"Config keys, set as section.key=value on the command line (default, meaning):\n{config_help(sections)}"
    return "\n\n".join(part for part in (doc.strip(), keys, TRACEBACK_NOTE) if part)


class Parser(argparse.ArgumentParser):
    """argparse for every script: the docstring as description, every config key of `sections` (with its
    default and meaning) after the options, and errors raised as user errors (run_cli prints them as one
    line) instead of usage + exit."""

    def __init__(self, doc: str = "", sections: dict | None = None, **kw):
        self.sections = sections
        kw.setdefault("description", doc or None)
        kw.setdefault("epilog", TRACEBACK_NOTE)
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)   # keeps the docstring's lines
        super().__init__(**kw)

    def format_help(self):
        if self.sections:   # read from the dataclasses' sources only when asked for
            self.epilog = cli_help("", self.sections)
        return super().format_help()

    def error(self, message):
        raise ValueError(f"{self.prog}: {message} (--help for usage)")


def run_cli(main, argv):
    """The `__main__` of every script: main(argv), with a user error printed as one line
    `error: <message>` on stderr and exit code 2 instead of a traceback (PAUSEREC_TRACEBACK=1 keeps the
    traceback). Other exceptions are bugs and keep theirs."""
    try:
        main(argv)
    except USER_ERRORS as e:
        if os.environ.get("PAUSEREC_TRACEBACK") == "1":
            raise
        message = " ".join(str(e).split()) or type(e).__name__   # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:   # `python train.py --help | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's advice: flush into nothing
        sys.exit(1)
